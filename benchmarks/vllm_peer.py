"""vLLM on the same HF weights and prompts, for benchmarks/serve.py on a GPU: run in its
own process (JAX and vLLM would both claim the GPU's memory), prints one JSON line.

  python benchmarks/vllm_peer.py HF_DIR PROMPTS_JSON NEW_TOKENS

PROMPTS_JSON: a list of token-id lists. Output: {"seconds": ..., "tokens": [[...], ...]}
(greedy, exactly NEW_TOKENS each; the engine's compile and warm-up not counted).
"""

from __future__ import annotations

import json
import sys
import time


def main():
  hf_dir, prompts_path, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
  import vllm
  from vllm.inputs import TokensPrompt

  prompts = json.loads(open(prompts_path).read())
  llm = vllm.LLM(model=hf_dir, skip_tokenizer_init=True, dtype="float32",
                 gpu_memory_utilization=0.4, max_num_seqs=len(prompts), seed=0)
  params = vllm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                               detokenize=False)
  inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
  llm.generate(inputs[:2], params, use_tqdm=False)  # warm
  t0 = time.perf_counter()
  outs = llm.generate(inputs, params, use_tqdm=False)
  seconds = time.perf_counter() - t0
  print(json.dumps({"seconds": seconds,
                    "tokens": [list(o.outputs[0].token_ids) for o in outs]}))


if __name__ == "__main__":
  main()
