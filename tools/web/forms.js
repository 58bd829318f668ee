// Times session.run of each models/forms/<form>.onnx (tools/web/bench_forms.py) at a 1-token and a 32-token input;
// the median of `reps` runs after 3 warm-ups. Result in window.eqcResult (or window.eqcError).
import * as ort from "onnxruntime-web";

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

async function timeRuns(session, seq, reps) {
  const x = new ort.Tensor("float32", Float32Array.from({ length: seq * 576 }, (_, i) => Math.sin(i)), [1, seq, 576]);
  for (let i = 0; i < 3; i++) await session.run({ x });
  const times = [];
  for (let i = 0; i < reps; i++) {
    const t = performance.now();
    await session.run({ x });
    times.push(performance.now() - t);
  }
  return median(times);
}

async function run() {
  const params = new URLSearchParams(location.search);
  const reps = parseInt(params.get("reps") ?? "30", 10);
  ort.env.wasm.numThreads = parseInt(params.get("threads") ?? "1", 10);
  ort.env.logLevel = "error";
  const forms = {};
  for (const form of params.get("forms").split(",")) {
    const t0 = performance.now();
    const session = await ort.InferenceSession.create(`models/forms/${form}.onnx`, { executionProviders: ["wasm"] });
    const loadMs = performance.now() - t0;
    forms[form] = { load_ms: loadMs, decode_ms: await timeRuns(session, 1, reps), prefill_ms: await timeRuns(session, 32, Math.max(5, reps / 3)) };
    await session.release();
  }
  return { forms, threads: ort.env.wasm.numThreads, cross_origin_isolated: self.crossOriginIsolated };
}

run().then(
  (r) => { document.getElementById("result").textContent = JSON.stringify(r, null, 2); window.eqcResult = r; },
  (e) => { window.eqcError = e instanceof Error ? `${e.message}\n${e.stack ?? ""}` : String(e); },
);
