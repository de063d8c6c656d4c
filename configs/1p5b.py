"""The paper's 1.5B shape (paper section 4; BUILD_NOTES.md, "Parameter counts"). Values the paper
does not give are marked [choice]."""

from free_transformer_jax.configlib import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 131_072  # 2**17 (paper)
    m.d_model = 1536
    m.n_layers = 28
    m.n_heads = 12
    m.n_kv_heads = 2
    m.head_dim = 128
    m.ffn_dim = 8960  # [choice] not given; Qwen2-1.5B-like
    m.rope_theta = 1_000_000.0  # [choice] not given; Qwen2-like
    m.norm_eps = 1e-6  # [choice]
    m.tie_embeddings = True  # paper
    m.latent_bits = 16  # paper
    m.inject_layer = 14  # paper: after block 14
    m.kappa_bits = 0.5  # [choice] among the paper's 1/4, 1/2, 1, 2
    m.dtype = "bfloat16"
    # Data: a TFDS dataset prepared as ArrayRecord (set tfds_name / tfds_data_dir on the command
    # line) and a SentencePiece model with 2**17 pieces. Context length is not given: [choice] 4096.
    c.data.source = "tfds"
    c.data.tfds_name = ""  # e.g. --config.data.tfds_name=my_corpus --config.data.tfds_data_dir=gs://...
    c.data.tokenizer = "sentencepiece"
    c.data.seq_len = 4096
    c.data.packing = "first_fit"
    c.data.num_workers = 4
    # [choice] recipe: 512 x 4096 = 2M tokens per step; 47B tokens = 22,400 steps.
    c.optim.lr = 4e-4
    c.optim.warmup_steps = 2000
    c.optim.min_lr_ratio = 0.1
    c.train.steps = 22_400
    c.train.batch_size = 512
    c.train.log_every = 10
    c.train.ckpt_every = 1000
    # [choice] FSDP inside a host (8 GPUs), data parallel across hosts; full remat.
    c.mesh.data = -1
    c.mesh.fsdp = 8
    m.remat_policy = "full"
    m.attention_chunk = 512  # [choice] queries per attention chunk: no T x T score matrix
    m.attention_impl = "auto"  # Splash on TPU, cuDNN / Pallas on GPU, chunked on CPU (BUILD_NOTES)
    return c
