# AR warm start on Qwen3-8B: blocks 0..24 with LoRA (trained in full they need ~80 GB of fp32 weights,
# gradients and Adam state per GPU). torchrun --nproc_per_node=4 train.py config/sft_ar_qwen3_8b.py
stage = 'sft_ar'
base_model = 'Qwen/Qwen3-8B'
data_dir = 'data/qwen3_8b_l24'
out_dir = 'out/qwen3_8b/sft_ar'
ar_lora_rank = 128
lora_alpha = 256.0
ar_lr = 8e-5
ar_max_tokens = 512  # datagen's max_length, so the context-ceiling run (--ar_input=context) reads whole contexts
batch_size = 128  # 4 GPUs * 32 rows
micro_batch = 32
gradient_checkpointing = True
warmup_steps = 50
eval_interval = 200
eval_rows = 1024
ckpt_interval = 200
