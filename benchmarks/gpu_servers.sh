#!/usr/bin/env bash
# Nudging on GPU serving engines: start a base model and a chat model on vLLM (or SGLang) with
# tensor parallelism, check that the pair answers through NudgedChatModel, and (vLLM) run
# benchmarks/vllm_servers.py against them: nudged against base alone on the same servers.
#
#   ENGINE=vllm BASE=meta-llama/Llama-3.1-70B CHAT=meta-llama/Llama-3.2-3B-Instruct \
#     BASE_GPUS=0,1,2,3 CHAT_GPUS=4 TP=4 benchmarks/gpu_servers.sh
#
# ENGINE_PYTHON is the interpreter that has vLLM or SGLang (default: python3); PYTHON the one
# with this package (default: .venv/bin/python). The servers are stopped when the script ends.
# docs/servers.md explains the flags and how to serve a base model across several nodes.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-vllm}
BASE=${BASE:?set BASE to the base model (a Hub id or a folder)}
CHAT=${CHAT:?set CHAT to the chat model (a Hub id or a folder)}
TP=${TP:-1}                # tensor-parallel GPUs for the base model
CHAT_TP=${CHAT_TP:-1}
BASE_GPUS=${BASE_GPUS:-0}
CHAT_GPUS=${CHAT_GPUS:-$BASE_GPUS}
BASE_PORT=${BASE_PORT:-8100}
CHAT_PORT=${CHAT_PORT:-8101}
MAX_LEN=${MAX_LEN:-8192}
ENGINE_PYTHON=${ENGINE_PYTHON:-python3}
PYTHON=${PYTHON:-.venv/bin/python}
START_TIMEOUT=${START_TIMEOUT:-1800}
LOGS=${LOGS:-$(mktemp -d)}

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT

start() {  # start MODEL GPUS TP PORT NAME
    local model=$1 gpus=$2 tp=$3 port=$4 name=$5
    case $ENGINE in
    vllm)
        CUDA_VISIBLE_DEVICES=$gpus "$ENGINE_PYTHON" -m vllm.entrypoints.openai.api_server \
            --model "$model" --served-model-name "$name" --host 127.0.0.1 --port "$port" \
            --tensor-parallel-size "$tp" --max-model-len "$MAX_LEN" \
            --max-logprobs 20 --logprobs-mode raw_logprobs \
            --enable-prompt-tokens-details --enable-prefix-caching \
            >"$LOGS/$name.log" 2>&1 &
        ;;
    sglang)
        CUDA_VISIBLE_DEVICES=$gpus SGLANG_RETURN_ORIGINAL_LOGPROB=1 "$ENGINE_PYTHON" \
            -m sglang.launch_server --model-path "$model" --served-model-name "$name" \
            --host 127.0.0.1 --port "$port" --tp "$tp" --context-length "$MAX_LEN" \
            >"$LOGS/$name.log" 2>&1 &
        ;;
    *) echo "ENGINE must be vllm or sglang" >&2; exit 2 ;;
    esac
    pids+=($!)
}

wait_health() {  # wait_health PORT NAME
    local deadline=$((SECONDS + START_TIMEOUT))
    until curl -sf "http://127.0.0.1:$1/health" >/dev/null; do
        if ((SECONDS > deadline)); then
            echo "$2 did not start within $START_TIMEOUT s; its log:" >&2
            tail -40 "$LOGS/$2.log" >&2
            exit 1
        fi
        sleep 5
    done
    echo "$2 answers on port $1 (log: $LOGS/$2.log)"
}

start "$BASE" "$BASE_GPUS" "$TP" "$BASE_PORT" base
start "$CHAT" "$CHAT_GPUS" "$CHAT_TP" "$CHAT_PORT" chat
wait_health "$BASE_PORT" base
wait_health "$CHAT_PORT" chat

BASE_URL="$ENGINE+http://127.0.0.1:$BASE_PORT"
CHAT_URL="$ENGINE+http://127.0.0.1:$CHAT_PORT"
"$PYTHON" - "$BASE_URL" "$CHAT_URL" <<'EOF'
import sys, time
from langchain_nudging import NudgedChatModel

llm = NudgedChatModel(model=sys.argv[1], nudging_model=sys.argv[2], max_tokens=128, timeout=300)
start = time.perf_counter()
message = llm.invoke("Give me three tips for staying healthy.")
segments = message.response_metadata["segments"]
share = sum(len(s["text"]) for s in segments if s["source"] == "nudge") / max(1, len(message.text))
print(f"answered in {time.perf_counter() - start:.1f} s, {share:.0%} of the text nudged:")
print(message.text)
assert message.text.strip() and {s["source"] for s in segments} == {"base", "nudge"}
EOF
if [[ $ENGINE == vllm ]]; then
    "$PYTHON" -m benchmarks.vllm_servers --base-url "http://127.0.0.1:$BASE_PORT" \
        --nudging-url "http://127.0.0.1:$CHAT_PORT" --max-tokens 256 --prompts 8 \
        --concurrent 32 --json "$LOGS/vllm_servers.json"
fi
