# Qwen3-8B (36 blocks, d_model 4096), activations at the output of block 24 (two thirds of the depth).
base_model = 'Qwen/Qwen3-8B'
corpus = 'hf://HuggingFaceFW/fineweb-edu/sample/10BT/000_00000.parquet'
max_docs = 40000  # 40,000 documents * 5 positions = 200,000 activations (3.3 GB of float32)
out_dir = 'data/qwen3_8b_l24'
layer = 24
positions_per_doc = 5
max_length = 512
batch_size = 32
dtype = 'bfloat16'
