# AR warm start on SmolLM2-135M-Instruct: blocks 0..20 trained in full, one epoch of ar_sft.
# The context-ceiling control is the same run on raw contexts:
#   python train.py config/sft_ar_smollm2.py --ar_input=context --out_dir=out/smollm2/sft_ar_context
stage = 'sft_ar'
base_model = 'HuggingFaceTB/SmolLM2-135M-Instruct'
data_dir = 'data/smollm2_l20'
out_dir = 'out/smollm2/sft_ar'
ar_lr = 1e-4
batch_size = 64
micro_batch = 64
warmup_steps = 20
eval_interval = 100
eval_rows = 512
ckpt_interval = 200
