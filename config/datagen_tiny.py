# A tiny run for the CPU: pass the model folder and corpus on the command line, e.g.
# python datagen.py config/datagen_tiny.py --base_model=/tmp/tiny/llama --corpus=/tmp/tiny/corpus.parquet
out_dir = 'data/tiny'
layer = 2
positions_per_doc = 4
min_position = 20
max_length = 128
device = 'cpu'
dtype = 'float32'
batch_size = 16
