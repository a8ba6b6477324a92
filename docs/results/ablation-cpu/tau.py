"""Greedy tau and acceptance per draft position at K=3 (full vocabulary) of several heads on the same Spec-Bench
prompts (the first N of each of its 13 categories, first turns), 128 new tokens; the base is loaded once."""
import json
import sys
import time

import torch

from hf_fastmtp import FastMTPForCausalLM, load_default
from hf_fastmtp.prompts import encode_chat

per_category, heads = int(sys.argv[1]), sys.argv[2:]
model, tokenizer = load_default()
base = model.model
rows = [json.loads(line) for line in open("hf_fastmtp/data/spec_bench.jsonl")]
seen, prompts = {}, []
for row in rows:
    category = row["category"]
    if seen.get(category, 0) < per_category:
        seen[category] = seen.get(category, 0) + 1
        prompts.append(row["turns"][0])
results = {}
for head in heads:
    fast = FastMTPForCausalLM.from_pretrained(head, base_model=base)
    drafted, accepted, cycles, tokens = [0, 0, 0], [0, 0, 0], 0, 0
    start = time.perf_counter()
    for prompt in prompts:
        inputs = encode_chat(tokenizer, prompt)
        out = fast.generate(**inputs, max_new_tokens=128, do_sample=False, fastmtp=True, num_draft_tokens=3,
                            draft_vocab="full")
        stats = fast.last_fastmtp_stats
        cycles += stats.cycles
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
        for k in range(3):
            drafted[k] += stats.drafted_per_position[k]
            accepted[k] += stats.accepted_per_position[k]
    results[head] = {"prompts": len(prompts), "tau": tokens / cycles, "cycles": cycles, "new_tokens": tokens,
                     "acceptance_cumulative": [a / max(drafted[0], 1) for a in accepted],
                     "seconds": time.perf_counter() - start}
    print(head, json.dumps(results[head]), flush=True)
json.dump(results, open("runs/ablation/tau.json", "w"), indent=1)
