#!/bin/bash
# Quantized KV cache on ort-cpu, both attention paths (tools/results/kv_gqa.md): fp32 ort-cpu, then for 8 and 4
# bits the asymmetric cache (unfused SimQuant attention) and the symmetric one (fused quantized GroupQueryAttention).
# usage: tools/bench_kv_gqa.sh FP32_ARTIFACT KV_STATS OUT_DIR [MAX_TOKENS]
#   KV_STATS: eqc calibrate FP32_ARTIFACT --data .../valid.txt --for kv --samples 16 --seq-len 512 -o KV_STATS
set -euo pipefail
FP=$1; C=$2; D=$3; N=${4:-8192}
E=${EQC:-eqc}
WT=$(dirname "$0")/../eqcompiler/datasets/wikitext-2/test.txt
$E compile "$FP" --recipe none --target ort-cpu -o "$D/fp32-cpu" --overwrite
for b in 8 4; do
  $E compile "$FP" --recipe none --kv-bits $b --calib "$C" --kv-scheme asymmetric --target ort-cpu -o "$D/kv$b-simquant" --overwrite
  $E compile "$FP" --recipe none --kv-bits $b --calib "$C" --target ort-cpu -o "$D/kv$b-gqa" --overwrite
done
uptime
$E bench "$D/fp32-cpu" "$D/kv8-simquant" "$D/kv8-gqa" "$D/kv4-simquant" "$D/kv4-gqa" --past 512 --prefill 64 --json > "$D/bench.json"
uptime
for a in fp32-cpu kv8-simquant kv8-gqa kv4-simquant kv4-gqa; do
  $E eval "$D/$a" --ppl "$WT" --max-tokens "$N" --no-latency --json > "$D/eval-$a.json"
done
