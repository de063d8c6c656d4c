"""The paper's 8B shape (paper section 4; BUILD_NOTES.md, "Parameter counts"). Values the paper does
not give are marked [choice]."""

from free_transformer_jax.configlib import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 131_072  # 2**17 (paper)
    m.d_model = 4096
    m.n_layers = 32
    m.n_heads = 32
    m.n_kv_heads = 8
    m.head_dim = 128
    m.ffn_dim = 14_336  # [choice] not given; Llama-3-8B
    m.rope_theta = 500_000.0  # [choice] Llama-3
    m.norm_eps = 1e-5  # [choice] Llama-3
    m.tie_embeddings = False  # [choice] not given; Llama-3 unties
    m.latent_bits = 16  # paper
    m.inject_layer = 16  # paper: after block 16
    m.kappa_bits = 0.5  # paper's 1T-token run: 1/2 bit
    m.dtype = "bfloat16"
    # Data: a TFDS dataset prepared as ArrayRecord (set tfds_name / tfds_data_dir on the command
    # line) and a SentencePiece model with 2**17 pieces. Context length is not given: [choice] 4096.
    c.data.source = "tfds"
    c.data.tfds_name = ""  # e.g. --config.data.tfds_name=my_corpus --config.data.tfds_data_dir=gs://...
    c.data.tokenizer = "sentencepiece"
    c.data.seq_len = 4096
    c.data.packing = "first_fit"
    c.data.num_workers = 4
    # [choice] Llama-3-8B-like recipe (the paper reuses its baseline's, unpublished):
    # 1024 x 4096 = 4M tokens per step; 200B tokens = 47,700 steps.
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.min_lr_ratio = 0.1
    c.train.steps = 47_700
    c.train.batch_size = 1024
    c.train.log_every = 10
    c.train.ckpt_every = 1000
    # [choice] FSDP inside a host (8 GPUs), data parallel across hosts; full remat. On TPU v5p-128
    # use --config.mesh.data=1 --config.mesh.fsdp=-1 (see BUILD_NOTES for per-chip memory).
    c.mesh.data = -1
    c.mesh.fsdp = 8
    m.remat_policy = "full"
    m.attention_chunk = 512  # [choice] queries per attention chunk: no T x T score matrix
    m.attention_impl = "auto"  # Splash on TPU, cuDNN / Pallas on GPU, chunked on CPU (BUILD_NOTES)
    return c
