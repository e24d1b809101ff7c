"""GPT-NeoX in plain PyTorch, with the parameter names of transformers' GPTNeoXForCausalLM."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neoxko import kernels
from neoxko.config import ModelConfig
from neoxko.kernels import Linear  # nn.Linear, with neoxko's CPU kernel for bf16 decoding


@dataclass
class Step:
    """What one forward call needs besides the token ids, shared by the model's layers: where the tokens go in the KV
    cache, their positions, who sees whom, and which logits are wanted. Generation, the server, training and scoring
    each fill the fields they use; model(idx) alone is a plain causal pass."""

    input_pos: Tensor | None = None  # cache slots: (T,) for every row, or (B, T) one row each; None: no cache
    left_pad: Tensor | None = None  # (B,) the left padding of each row (batched generation)
    rows: Tensor | None = None  # (B,) the cache rows the batch's rows use (the server); None: rows 0..B-1
    kv_len: int | None = None  # how many cache slots to attend over (the server: its longest row's)
    positions: Tensor | None = None  # (B, T) the rotary positions of packed or tree-shaped rows (no cache)
    mask: Tensor | None = None  # (B, 1, T, T) who sees whom in those rows
    keep: Tensor | None = None  # the positions whose logits are wanted (N, vocab_size): a loss's targets


PLAIN = Step()


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written in place at the given slots."""

    def __init__(self, batch_size: int, n_head: int, max_seq_len: int, head_size: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: Tensor | None = None,
               kv_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_head, T, head_size) at slots input_pos and return the keys and values to attend to.

        input_pos (T,) is shared by all rows; (B, T) gives each row its own slots. rows (B,) picks the
        cache rows the batch rows are (default: the first B, in order); kv_len trims the returned cache to its
        first kv_len slots, so attention reads only the slots in use.
        """
        if input_pos.dim() == 1 and rows is None:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            keys, values = self.k, self.v
        else:
            pos = input_pos.expand(k.size(0), -1) if input_pos.dim() == 1 else input_pos
            r = rows if rows is not None else torch.arange(k.size(0), device=k.device)
            self.k[r[:, None], :, pos] = k.transpose(1, 2)  # (B, T, n_head, head_size) into (B, n_head, S, ...)
            self.v[r[:, None], :, pos] = v.transpose(1, 2)
            if rows is not None:  # a gathered copy of those rows, of the slots in use only
                n = kv_len or self.k.size(2)
                return self.k[rows, :, :n], self.v[rows, :, :n]
            keys, values = self.k[:k.size(0)], self.v[:k.size(0)]  # the batch is cache rows 0..B-1: a view
        if kv_len is not None:
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        return keys, values


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.n_head = config.num_attention_heads
        self.head_size = config.head_size
        self.rotary_ndims = config.rotary_ndims
        self.query_key_value = Linear(d, 3 * d, bias=config.attention_bias)
        self.dense = Linear(d, d, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, step: Step = PLAIN) -> Tensor:
        B, T, C = x.shape
        # GPT-NeoX interleaves q, k, v per head: (B, T, n_head, 3 * head_size)
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_size)
        q, k, v = qkv.transpose(1, 2).split(self.head_size, dim=-1)  # 3 x (B, n_head, T, head_size)
        q, k = apply_rope(q, rope, self.rotary_ndims), apply_rope(k, rope, self.rotary_ndims)
        if step.input_pos is not None:
            k, v = self.kv_cache.update(step.input_pos, k, v, step.rows, step.kv_len)
        y = attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dense(y)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention. One query per row (decoding) on the CPU goes to neoxko's kernel, which reads the
    cache once in its own dtype (torch's CPU flash kernel spends 0.2-0.35 ms setting up a single query, 4.2 ms at 2,048
    keys, for 16 heads of 128), else two float32 products."""
    if kernels.attention_takes(q, k, v, mask):
        return kernels.attend_one(q, k, v, mask)
    if q.size(2) > 1 or q.device.type != "cpu" or q.requires_grad or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    scores = q.float() @ k.float().transpose(-2, -1) * q.size(-1) ** -0.5  # (B, n_head, 1, S)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.use_parallel_residual = config.use_parallel_residual

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, step: Step = PLAIN) -> Tensor:
        a = self.attention(self.input_layernorm(x), rope, mask, step)
        if self.use_parallel_residual:
            # x = x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.post_attention_layernorm(x))
        # x = x + attn(ln1(x)); x = x + mlp(ln2(x))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoX(nn.Module):
    """GPT-NeoX causal LM. model(idx) -> logits (B, T, vocab_size).

    One forward serves training, scoring and cached decoding:
    - input_pos None: positions 0..T-1, no cache (training, scoring a batch of full sequences);
    - input_pos (T,): the cache slots the T tokens take; keys and values are written there and the
      queries attend to every earlier slot (call setup_cache first);
    - input_pos (B, T): each row's own slots, for rows at different lengths (continuous batching);
      rows (B,) says which cache rows the batch rows use, kv_len how many slots attention reads.
    positions (B, T) and mask (bool, B, 1, T, T) instead: packed rows, each token's rotary position and whom it
    sees (fine-tuning packs several examples into a row, none attending to another). keep (bool, B, T) returns the
    logits of those positions only, (N, vocab_size): fine-tuning's loss falls on the answer tokens alone.
    left_pad (B,) counts the padding tokens at the start of each row of a left-padded batch: they are
    masked out, and rotary positions start at 0 on each row's first real token.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = nn.ModuleDict(dict(
            embed_in=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            final_layer_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        ))
        self.embed_out = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        self.setup_rope()

    def setup_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the rotary tables; they are not in checkpoints."""
        c = self.config
        device = device if device is not None else self.gpt_neox.embed_in.weight.device
        # Computed as transformers does, in float32, so positions match bit for bit.
        dim = c.rotary_ndims
        inv_freq = 1.0 / (c.rotary_emb_base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        t = torch.arange(c.max_position_embeddings, dtype=torch.float, device=device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, rotary_ndims)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the rotary tables too; rebuild them in float32 instead.
        super()._apply(fn, recurse)
        # to_empty (meta -> a device) makes a new parameter per module, which unties a tied head: tie it again
        head, embedding = self.embed_out.weight, self.gpt_neox.embed_in.weight
        if self.config.tie_word_embeddings and head is not embedding and type(head) is nn.Parameter:
            self.embed_out.weight = embedding
        if self.rope_cos.dtype != torch.float32:
            self.setup_rope(self.rope_cos.device)
        return self

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None,
                    dtype: torch.dtype | None = None) -> None:
        c = self.config
        max_seq_len = max_seq_len or c.max_position_embeddings
        weight = self.gpt_neox.embed_in.weight
        for block in self.gpt_neox.layers:
            block.attention.kv_cache = KVCache(batch_size, c.num_attention_heads, max_seq_len,
                                               c.head_size, dtype or weight.dtype, weight.device)

    def clear_cache(self) -> None:
        for block in self.gpt_neox.layers:
            block.attention.kv_cache = None

    def forward(self, idx: Tensor, step: Step = PLAIN) -> Tensor:
        if not isinstance(step, Step):
            raise TypeError(f"GPTNeoX(idx, step) takes a neoxko.model.Step, not {type(step).__name__}: "
                            "write model(idx, Step(input_pos=...)) where older code wrote model(idx, input_pos)")
        hidden = self.hidden_states(idx, step)
        if step.keep is not None:  # the logits of these positions only (N, vocab_size): the ones a loss falls on
            hidden = hidden[step.keep]
        return self.embed_out(hidden)

    def hidden_states(self, idx: Tensor, step: Step = PLAIN) -> Tensor:
        """The final layer-normed hidden states (B, T, hidden_size); embed_out turns them into logits."""
        if step.positions is not None:  # packed or tree-shaped rows: their positions and mask
            rope = self.rope_cos[step.positions].unsqueeze(1), self.rope_sin[step.positions].unsqueeze(1)
            return self._blocks(idx, rope, step.mask, step)
        input_pos, left_pad = step.input_pos, step.left_pad
        if input_pos is None:
            slots = torch.arange(idx.size(1), device=idx.device)
            # None: SDPA's own causal mask, the fast path for training and scoring.
            mask = None if left_pad is None else self._mask(slots, idx.size(1), left_pad)
        else:
            cache = self.gpt_neox.layers[0].attention.kv_cache
            if cache is None:
                raise RuntimeError("call model.setup_cache(batch_size, max_seq_len) before cached decoding")
            n_keys = step.kv_len or cache.k.size(2)
            if input_pos.dim() == 2:  # per-row slots; rows start at slot 0, so no left padding
                keys = torch.arange(n_keys, device=idx.device)
                mask = (keys[None, None, :] <= input_pos[:, :, None])[:, None]  # (B, 1, T, n_keys)
                rope = self.rope_cos[input_pos].unsqueeze(1), self.rope_sin[input_pos].unsqueeze(1)
                return self._blocks(idx, rope, mask, step)
            # Queries see the whole preallocated cache through a mask: static shapes, no host sync.
            slots = input_pos
            mask = self._mask(slots, n_keys, left_pad)
        return self._blocks(idx, self._rope(slots, left_pad), mask, step)

    def _blocks(self, idx: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, step: Step) -> Tensor:
        x = self.gpt_neox.embed_in(idx)
        for block in self.gpt_neox.layers:
            x = block(x, rope, mask, step)
        return self.gpt_neox.final_layer_norm(x)

    def _rope(self, slots: Tensor, left_pad: Tensor | None) -> tuple[Tensor, Tensor]:
        pos = slots[None, :]  # (1, T)
        if left_pad is not None:
            pos = (pos - left_pad[:, None]).clamp(min=0)  # (B, T)
        return self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B|1, 1, T, rotary_ndims)

    @staticmethod
    def _mask(slots: Tensor, n_keys: int, left_pad: Tensor | None) -> Tensor:
        """Boolean attention mask (B|1, 1, T, n_keys): causal, and blind to left padding."""
        keys = torch.arange(n_keys, device=slots.device)
        mask = keys[None, :] <= slots[:, None]  # (T, n_keys)
        if left_pad is None:
            return mask[None, None]
        real = keys[None, None, :] >= left_pad[:, None, None]  # (B, 1, n_keys)
        # A padding query sees itself, so its softmax row is never empty (its output is unused).
        own = keys[None, :] == slots[:, None]  # (T, n_keys)
        return (mask[None] & (real | own[None]))[:, None]  # (B, 1, T, n_keys)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor], rotary_ndims: int) -> Tensor:
    """Rotate the first rotary_ndims dims of each head (GPT-NeoX's rotate-half form)."""
    cos, sin = rope
    x_rot, x_pass = x[..., :rotary_ndims], x[..., rotary_ndims:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rot = (x_rot.float() * cos + rotated * sin).to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


def activation(name: str):
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    return nn.GELU(approximate="tanh")  # gelu_new, gelu_fast, gelu_pytorch_tanh


def init_weights(model: GPTNeoX, std: float | None = None) -> None:
    """Random weights as transformers initialises GPT-NeoX: normal(0, initializer_range), zero biases."""
    std = model.config.initializer_range if std is None else std
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once

