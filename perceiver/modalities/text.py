"""Text: the UTF-8 bytes tokenizer of Perceiver IO, token + learned position embeddings, and the
masked-language-model head (tied to the input embeddings, as the paper's MLM).

Decoding side of the MLM: a ``TrainableQueryProvider(max_seq_len, C)`` (one learned query per
position) into a ``PerceiverDecoder`` without output projection, then ``MaskedLMOutputAdapter``.
The official model (and transformers) decodes all ``max_seq_len`` positions whatever the input
length; pass ``subsampled_points=torch.arange(L)`` to decode only the first ``L``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..adapters import InputAdapter, OutputAdapter
from ..position import TrainablePositionEncoding
from .common import check_positive


class BytesTokenizer:
    """UTF-8 bytes shifted by 6 reserved ids: PAD=0, BOS=1, EOS=2, MASK=3, CLS=4, SEP=5; vocabulary 262.

    ``add_special_tokens=True`` wraps a text as ``[CLS] ... [SEP]`` (what transformers'
    ``PerceiverTokenizer`` does for the published checkpoints); the official code adds none.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    mask_token_id = 3
    cls_token_id = 4
    sep_token_id = 5
    num_reserved_tokens = 6
    vocab_size = 256 + num_reserved_tokens

    def encode(self, text: Union[str, bytes], add_special_tokens: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = [b + self.num_reserved_tokens for b in data]
        return [self.cls_token_id, *ids, self.sep_token_id] if add_special_tokens else ids

    def decode(self, ids: Union[Sequence[int], Tensor]) -> str:
        """Bytes of the non-special ids, decoded as UTF-8 (invalid sequences replaced)."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        data = bytes(i - self.num_reserved_tokens for i in values if self.num_reserved_tokens <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def __call__(
        self,
        texts: Union[str, Sequence[str]],
        max_length: Optional[int] = None,
        add_special_tokens: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """-> ``(ids, mask)``: (B, L) long ids right-padded with PAD and (B, L) bool, True = real token.

        ``L`` is ``max_length`` when given (longer texts are truncated) else the longest text.
        """
        if isinstance(texts, str):
            texts = [texts]
        seqs = [self.encode(t, add_special_tokens) for t in texts]
        if max_length is not None:
            check_positive(type(self).__name__, max_length=max_length)
            seqs = [s[:max_length] for s in seqs]
        length = max_length if max_length is not None else max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, s in enumerate(seqs):
            mask[i, : len(s)] = True
        return ids, mask


class TextInputAdapter(InputAdapter):
    """Token ids (B, L) -> token embedding + learned position embedding (B, L, C), L <= ``max_seq_len``.

    With ``pad_token_id`` set, also returns the padding mask ``ids != pad_token_id`` (True = valid).
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        num_channels: int,
        init_scale: float = 0.02,
        pad_token_id: Optional[int] = None,
    ):
        super().__init__()
        check_positive(type(self).__name__, vocab_size=vocab_size, max_seq_len=max_seq_len, num_channels=num_channels)
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.pad_token_id = pad_token_id
        self.embedding = nn.Embedding(vocab_size, num_channels)
        nn.init.trunc_normal_(self.embedding.weight, std=init_scale, a=-2 * init_scale, b=2 * init_scale)
        self.positions = TrainablePositionEncoding(max_seq_len, num_channels, init_scale)
        self.num_input_channels = num_channels

    def forward(self, ids: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"token ids must be a (batch, length) integer tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_seq_len={self.max_seq_len}")
        x = self.embedding(ids) + self.positions.embeddings[: ids.shape[1]]  # (B, L, C)
        if self.pad_token_id is None:
            return x
        return x, ids != self.pad_token_id


class MaskedLMOutputAdapter(OutputAdapter):
    """Decoder output (B, N, C) -> vocabulary logits (B, N, V).

    Tied (``embedding`` given): ``x @ E^T + b`` with the input embedding matrix ``E`` and a
    learned bias, as the official model. Untied: a linear layer ``C -> vocab_size``.
    """

    def __init__(
        self,
        embedding: Optional[nn.Embedding] = None,
        num_input_channels: Optional[int] = None,
        vocab_size: Optional[int] = None,
    ):
        super().__init__()
        if embedding is not None:
            self.embedding: Optional[nn.Embedding] = embedding
            self.projection: Optional[nn.Linear] = None
            self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))
        else:
            if num_input_channels is None or vocab_size is None:
                raise ValueError("an untied MaskedLMOutputAdapter needs num_input_channels and vocab_size")
            check_positive(type(self).__name__, num_input_channels=num_input_channels, vocab_size=vocab_size)
            self.embedding = None
            self.projection = nn.Linear(num_input_channels, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.projection is not None:
            return self.projection(x)
        weight = self.embedding.weight  # (V, C)
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"decoder output has {x.shape[-1]} channels, the tied embedding {weight.shape[1]}")
        return x @ weight.t() + self.bias
