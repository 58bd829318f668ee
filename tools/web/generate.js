// Greedy decoding of an eqc causal-LM artifact with onnxruntime-web (WASM backend), mirroring
// eqcompiler.decode.generate: tokenize the prompt (special tokens as the tokenizer adds them), prefill it,
// then feed one token per step with every present.X output fed back as past_key_values.X; stop at the
// manifest's eos id(s) or after max_new_tokens. The result lands in window.eqcResult (or window.eqcError).
import * as ort from "onnxruntime-web";
import { Tokenizer } from "@huggingface/tokenizers";

const PAST = "past_key_values.", PRESENT = "present.";

// Zero-length past tensors need a typed array of the input's element type (a quantized cache carries
// int8/uint8 codes and float scales, so not every past input is float32).
const ARRAYS = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array, int8: Int8Array, uint8: Uint8Array,
  int16: Int16Array, uint16: Uint16Array, int32: Int32Array, uint32: Uint32Array, int64: BigInt64Array,
  uint64: BigUint64Array, bool: Uint8Array,
};

const $ = (id) => document.getElementById(id);

async function fetchOk(url, as) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status}`);
  return as === "json" ? res.json() : res.arrayBuffer();
}

// The `location` strings of the model's external-data initializers. onnxruntime-web matches each
// externalData entry by this exact string, so read it from the protobuf instead of guessing
// "model.onnx.data": every StringStringEntryProto {key: "location", value: V} is encoded as
// 0x0a 0x08 "location" 0x12 varint(len(V)) V.
function externalDataLocations(bytes) {
  const key = [0x0a, 0x08, ...new TextEncoder().encode("location"), 0x12];
  const found = new Set();
  outer: for (let i = bytes.indexOf(0x0a); i >= 0 && i + key.length < bytes.length; i = bytes.indexOf(0x0a, i + 1)) {
    for (let k = 1; k < key.length; k++) if (bytes[i + k] !== key[k]) continue outer;
    let p = i + key.length, len = 0, shift = 0, b;
    do { b = bytes[p++]; len |= (b & 0x7f) << shift; shift += 7; } while (b & 0x80 && shift < 35);
    found.add(new TextDecoder().decode(bytes.subarray(p, p + len)));
  }
  return [...found];
}

function int64(values, dims) {
  return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

function range(start, end) {
  return Array.from({ length: end - start }, (_, i) => start + i);
}

// np.argmax over the last position's logits: the first index of the maximum wins ties.
function argmaxLast(logits) {
  const vocab = logits.dims[logits.dims.length - 1];
  const data = logits.data, off = data.length - vocab;
  let best = 0, bestValue = data[off];
  for (let j = 1; j < vocab; j++) if (data[off + j] > bestValue) { bestValue = data[off + j]; best = j; }
  return best;
}

async function run() {
  const params = new URLSearchParams(location.search);
  const model = params.get("model");
  if (!model) throw new Error("missing ?model=URL_OF_ARTIFACT_FOLDER");
  const prompt = params.get("prompt") ?? "The quick brown fox";
  const maxNew = parseInt(params.get("max_new_tokens") ?? "32", 10);
  const threads = parseInt(params.get("threads") ?? "1", 10);
  if (!(maxNew >= 1)) throw new Error(`max_new_tokens must be >= 1, got ${params.get("max_new_tokens")}`);
  const base = new URL(model.endsWith("/") ? model : model + "/", location.href);

  // Threads need SharedArrayBuffer, i.e. a cross-origin-isolated page; otherwise ORT quietly uses one.
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.proxy = params.get("proxy") === "1";  // run ORT in a worker instead of the page's main thread
  ort.env.logLevel = "error";

  const t0 = performance.now();
  const manifest = await fetchOk(new URL("manifest.json", base), "json");
  if (manifest.task && manifest.task !== "causal-lm") throw new Error(`'${model}' is a ${manifest.task} model, not a causal LM`);
  const [tokJson, tokConfig, modelBuf] = await Promise.all([
    fetchOk(new URL("tokenizer.json", base), "json"),
    fetchOk(new URL("tokenizer_config.json", base), "json").catch(() => ({})),
    fetchOk(new URL(manifest.model_file ?? "model.onnx", base)),
  ]);
  const tokenizer = new Tokenizer(tokJson, tokConfig);
  const modelBytes = new Uint8Array(modelBuf);
  const externalData = externalDataLocations(modelBytes).map((path) => ({ path, data: new URL(path, base).href }));
  $("status").textContent = `loading ${base.href} (${externalData.map((e) => e.path).join(", ") || "no external data"})…`;
  const session = await ort.InferenceSession.create(modelBytes, { executionProviders: ["wasm"], externalData });
  const loadMs = performance.now() - t0;

  const inputs = new Map(session.inputMetadata.map((m) => [m.name, m]));
  const cacheOutputs = session.outputNames.filter((n) => n.startsWith(PRESENT));
  if (!cacheOutputs.length || cacheOutputs.some((n) => !inputs.has(PAST + n.slice(PRESENT.length))))
    throw new Error("the model has no usable KV cache (present.* outputs matching past_key_values.* inputs)");
  let past = {};
  for (const [name, meta] of inputs) {
    if (!name.startsWith(PAST)) continue;
    const dims = meta.shape.map((d, i) => (i === 0 ? 1 : i === 2 ? 0 : d));
    if (dims.some((d) => typeof d !== "number")) throw new Error(`past input '${name}' has unknown dims ${meta.shape}`);
    past[name] = new ort.Tensor(meta.type, new ARRAYS[meta.type](0), dims);
  }
  let pastLen = 0;

  // One step: ids after the cached tokens -> logits; the present outputs become the next past.
  async function step(ids) {
    const seq = ids.length;
    const feeds = { input_ids: int64(ids, [1, seq]), ...past };
    if (inputs.has("attention_mask")) feeds.attention_mask = int64(new Array(pastLen + seq).fill(1), [1, pastLen + seq]);
    if (inputs.has("position_ids")) feeds.position_ids = int64(range(pastLen, pastLen + seq), [1, seq]);
    const out = await session.run(feeds);
    past = Object.fromEntries(cacheOutputs.map((n) => [PAST + n.slice(PRESENT.length), out[n]]));
    pastLen += seq;
    return out.logits;
  }

  const promptIds = Array.from(tokenizer.encode(prompt).ids, Number);
  if (!promptIds.length) throw new Error("the prompt is empty after tokenization");
  const eos = manifest.tokenizer?.eos_token_id;
  const eosIds = new Set((Array.isArray(eos) ? eos : [eos]).filter((e) => e !== null && e !== undefined));

  $("status").textContent = `generating (${threads} thread(s), crossOriginIsolated=${self.crossOriginIsolated})…`;
  const start = performance.now();
  let logits = await step(promptIds);
  const prefillMs = performance.now() - start;
  const tokens = [];
  let stopped = "max_new_tokens";
  while (tokens.length < maxNew) {
    const token = argmaxLast(logits);
    if (eosIds.has(token)) { stopped = "eos"; break; }
    tokens.push(token);
    if (tokens.length === maxNew) break;
    logits = await step([token]);
  }
  const totalMs = performance.now() - start;
  // As eqc generate's ms_per_token: decode steps only (the first new token comes from the prefill).
  const decodeSteps = Math.max(tokens.length - 1, 0);
  const decodeMsPerToken = decodeSteps ? (totalMs - prefillMs) / decodeSteps : null;
  return {
    prompt, prompt_ids: promptIds, tokens, text: tokenizer.decode(tokens, { skip_special_tokens: true }),
    new_tokens: tokens.length, stopped,
    tokens_per_s: decodeMsPerToken ? 1000 / decodeMsPerToken : tokens.length / (totalMs / 1000),
    prefill_ms: prefillMs, decode_ms_per_token: decodeMsPerToken, load_ms: loadMs,
    threads, cross_origin_isolated: self.crossOriginIsolated, ort_version: ort.env.versions?.web ?? null,
    external_data: externalData.map((e) => e.path),
  };
}

run().then(
  (result) => {
    $("text").textContent = result.prompt + result.text;
    $("status").textContent = `done: ${result.new_tokens} tokens, stopped at ${result.stopped}, ` +
      `${result.tokens_per_s.toFixed(2)} tokens/s (${result.threads} thread(s))`;
    $("result").textContent = JSON.stringify(result, null, 2);
    window.eqcResult = result;
  },
  (err) => {
    const message = err instanceof Error ? `${err.message}\n${err.stack ?? ""}` : String(err);
    $("status").textContent = "failed";
    $("error").textContent = message;
    window.eqcError = message;
  },
);
