// node run_chromium.mjs URL
// Opens URL (index.html?model=...) in headless Chromium, waits for window.eqcResult or window.eqcError,
// prints the result as JSON on stdout; exit 1 on a page error, 2 on a timeout or launch failure.
// CHROMIUM_PATH: the browser (default: Debian's /usr/lib/chromium/chromium); EQC_WEB_TIMEOUT_MS (default 300000).
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import puppeteer from "puppeteer-core";

const url = process.argv[2];
if (!url) {
  console.error("usage: node run_chromium.mjs URL");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM_PATH ||
  ["/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"].find((p) => fs.existsSync(p));
const timeout = parseInt(process.env.EQC_WEB_TIMEOUT_MS || "300000", 10);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "eqc-chromium-"));

let browser;
let code = 2;
try {
  browser = await puppeteer.launch({
    executablePath,
    headless: true,
    userDataDir,
    // --no-sandbox: the tests run as root in a container; the rest keeps Chromium off the network.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") console.error(`[page] ${msg.text()}`); });
  page.on("pageerror", (err) => console.error(`[page error] ${err.message}`));
  await page.goto(url, { waitUntil: "load", timeout });
  await page.waitForFunction(() => window.eqcResult !== undefined || window.eqcError !== undefined,
                             { timeout, polling: 100 });
  const { result, error } = await page.evaluate(() => ({ result: window.eqcResult, error: window.eqcError }));
  if (error !== undefined) {
    console.error(`page error: ${error}`);
    code = 1;
  } else {
    console.log(JSON.stringify(result));
    code = 0;
  }
} catch (err) {
  console.error(`run_chromium: ${err.message}`);
} finally {
  if (browser) await browser.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
