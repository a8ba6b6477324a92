"""FastMTP on the embedded SmolLM2-135M-Instruct: same answer as plain greedy decoding, fewer model passes."""

from hf_fastmtp import load_default
from hf_fastmtp.prompts import encode_chat

model, tokenizer = load_default()
inputs = encode_chat(tokenizer, "Give three tips for staying healthy.")

plain = model.generate(**inputs, max_new_tokens=96, do_sample=False)
fast = model.generate(**inputs, max_new_tokens=96, do_sample=False, fastmtp=True, num_draft_tokens=3)

print(tokenizer.decode(fast[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
print("identical to plain greedy:", bool((plain == fast).all()))
stats = model.last_fastmtp_stats
print(f"tau {stats.tau:.2f}, acceptance per position {[round(a, 2) for a in stats.acceptance_cumulative]}")
