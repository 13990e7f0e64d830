# Shared by the tiny CPU configs: pass --base_model and --data_dir (see tests/ and README).
device = 'cpu'
dtype = 'float32'
lora_rank = 8
lora_alpha = 16.0
batch_size = 16
micro_batch = 16
eval_rows = 24
eval_interval = 10
ckpt_interval = 10
warmup_steps = 2
ar_max_tokens = 64
# rl: 4 prompts * 4 rollouts = 16 per step
batch_prompts = 4
group_size = 4
max_new_tokens = 24
length_slack = 4
gen_batch_size = 16
