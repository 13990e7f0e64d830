# Held-out metrics of the RL checkpoint, with the shuffled control and the context ceiling.
stage = 'eval'
base_model = 'HuggingFaceTB/SmolLM2-135M-Instruct'
data_dir = 'data/smollm2_l20'
out_dir = 'out/smollm2/eval'
init_av = 'out/smollm2/rl'
init_ar = 'out/smollm2/rl'
context_ar = 'out/smollm2/sft_ar_context'
max_new_tokens = 96
eval_rows = 1024
gen_batch_size = 1024
micro_batch = 64
