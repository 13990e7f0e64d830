# GRPO on Qwen3-8B, 4 GPUs, vLLM rollouts (vllm==0.26.0):
#   torchrun --nproc_per_node=4 train.py config/rl_qwen3_8b.py --lr=1e-4
stage = 'rl'
base_model = 'Qwen/Qwen3-8B'
data_dir = 'data/qwen3_8b_l24'
out_dir = 'out/qwen3_8b/rl'
init_av = 'out/qwen3_8b/sft_av'
init_ar = 'out/qwen3_8b/sft_ar'
rollout = 'vllm'
vllm_gpu_memory = 0.32  # 25.6 GB of an 80 GB H100: 16.4 bf16 weights, ~3.5 profiling peak and CUDA graphs, ~5 KV
max_steps = 500
batch_prompts = 256
group_size = 8  # 256 prompts * 8 rollouts = 2048 rollouts per step, 512 per GPU
max_new_tokens = 160
length_slack = 32
micro_batch = 8
gradient_checkpointing = True
lr = 1e-4
ar_lr = 8e-5
kl_coef = 0.05
warmup_steps = 10
min_lr_frac = 1.0  # constant after warmup
eval_interval = 50
eval_rows = 1024
ckpt_interval = 50
