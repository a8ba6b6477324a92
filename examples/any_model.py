"""Give any decoder-only Transformers model a FastMTP head, stream with it, and save the head as a Hub folder."""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from hf_fastmtp import FastMTPForCausalLM

base_name = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM2-135M-Instruct"
base = AutoModelForCausalLM.from_pretrained(base_name)
tokenizer = AutoTokenizer.from_pretrained(base_name)

# A new head starts from the base model's last layer; train it with `fastmtp distill` + `fastmtp train`.
model = FastMTPForCausalLM.from_base(base, base_model_name_or_path=base_name)
inputs = tokenizer.apply_chat_template(
    [{"role": "user", "content": "Write a haiku about the sea."}],
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=True,
)
model.generate(**inputs, max_new_tokens=64, fastmtp=True, streamer=TextStreamer(tokenizer, skip_prompt=True))
print(model.last_fastmtp_stats.to_dict())

# Head-only folder: config (naming the base), head weights and the code, loadable with trust_remote_code.
model.save_pretrained("my-fastmtp-head")
