# AV warm start on SmolLM2-135M-Instruct: one epoch of av_sft (30% of ~60k rows = ~18k rows / 64 = ~280 steps)
stage = 'sft_av'
base_model = 'HuggingFaceTB/SmolLM2-135M-Instruct'
data_dir = 'data/smollm2_l20'
out_dir = 'out/smollm2/sft_av'
lora_rank = 32
lora_alpha = 64.0
lr = 3e-4
batch_size = 64
micro_batch = 64
warmup_steps = 20
eval_interval = 100
eval_rows = 512
ckpt_interval = 200
