# SmolLM2-135M-Instruct (30 blocks, d_model 576), activations at the output of block 20 (two thirds).
# Online, the defaults read from the Hugging Face hub. Offline, point at local copies (passages of books: a
# book's passages go to one split):
#   python datagen.py config/datagen_smollm2.py --base_model=$HOME/models/smollm2 \
#       --corpus=../shared/assets/gutenberg-docs.parquet --group_column=source
base_model = 'HuggingFaceTB/SmolLM2-135M-Instruct'
corpus = 'hf://HuggingFaceFW/fineweb-edu/sample/10BT/000_00000.parquet'
max_docs = 12000  # 12,000 documents * 5 positions = 60,000 activations (fewer where documents are short)
out_dir = 'data/smollm2_l20'
layer = 20
positions_per_doc = 5
min_position = 50
max_length = 256
batch_size = 64
dtype = 'bfloat16'
