# GRPO on SmolLM2-135M-Instruct from the two SFT outputs, on one GPU.
stage = 'rl'
base_model = 'HuggingFaceTB/SmolLM2-135M-Instruct'
data_dir = 'data/smollm2_l20'
out_dir = 'out/smollm2/rl'
init_av = 'out/smollm2/sft_av'
init_ar = 'out/smollm2/sft_ar'
context_ar = 'out/smollm2/sft_ar_context'
max_steps = 200
batch_prompts = 64
group_size = 8  # 64 prompts * 8 rollouts = 512 rollouts per step
max_new_tokens = 96
length_slack = 16
gen_batch_size = 512
micro_batch = 64
lr = 1e-4
ar_lr = 3e-5
kl_coef = 0.05
warmup_steps = 5
min_lr_frac = 1.0  # constant after warmup
eval_interval = 25
eval_rows = 512
ckpt_interval = 25
