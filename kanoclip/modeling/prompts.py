"""KnPL prompts (paper §2.2.2, eq. 1) on CLIP's frozen text encoder.

    P_n = [N1][N2]...[NK][normal adjective][class]
    P_a = [A1][A2]...[AK][abnormal adjective][class]

``N_i`` and ``A_i`` are learnable word embeddings (K = 12). They are spliced into the token
embeddings of the tokenised prompt in place of K placeholder tokens and run through CLIP's own
text transformer; the feature is the EOT token's, through the final layer norm and the text
projection — exactly what ``CLIPModel.get_text_features`` computes for plain tokens (a test
checks the two agree). Several adjectives per state are used and their features averaged.
The context vectors are shared by every class (CoOp's unified context), so prompts learned on
one dataset apply to any class name a user types.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from kanoclip.config import PromptConfig
from kanoclip.knowledge.classes import display_name as class_text  # metal_nut -> "metal nut"

_PLACEHOLDER = "X"

# A tokenizers-backed tokenizer sets its padding and truncation on itself for each call, so calls
# from several threads (models sharing one backbone's tokenizer) could use each other's settings.
_TOKENIZER_LOCK = threading.Lock()


def causal_mask(text_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """CLIP's causal text mask for ``hidden``, for the model's attention implementation.

    SDPA (transformers' default) gets ``None`` and applies causality itself (``is_causal``), with
    its fastest kernels; any other implementation gets an additive ``(1, 1, T, T)`` float mask
    (0 on and below the diagonal). Built here rather than with
    ``transformers.masking_utils.create_causal_mask``, whose arguments changed more than once
    within transformers 5.x.

    Args:
        text_model: CLIP's text transformer (its ``config._attn_implementation`` is read).
        hidden: (N, T, D) the embedded tokens the mask is for (its length, dtype and device).

    Returns:
        None for SDPA, else a (1, 1, T, T) additive mask of ``hidden``'s dtype: 0 where a token
        may attend, the dtype's minimum above the diagonal.
    """
    if getattr(text_model.config, "_attn_implementation", "eager") == "sdpa":
        return None
    length = hidden.shape[1]
    blocked = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
    mask = torch.zeros(length, length, dtype=hidden.dtype, device=hidden.device)
    return mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None]


_AN_EXCEPTIONS = ("one", "uni", "use", "usu", "eu", "ewe")  # vowel letters that sound like a consonant


def fix_articles(text: str) -> str:
    """``"a photo of a unblemished bottle."`` -> ``"a photo of an unblemished bottle."``.

    The written rule (``an`` before a vowel letter, with a few "you"/"one" sounds kept as
    ``a``), which is all the state and class words of a prompt need.

    Args:
        text: a text whose ``a``/``an`` articles may not fit the next word.

    Returns:
        ``text`` with each ``a``/``an`` (capitalised or not) set by the word after it.

    >>> fix_articles("a photo of a unblemished bottle.")
    'a photo of an unblemished bottle.'
    >>> fix_articles("An damaged screw, a usual one and an unit.")
    'A damaged screw, a usual one and a unit.'
    """

    def article(match: re.Match[str]) -> str:
        word = match.group(2)
        vowel = word[0].lower() in "aeiou" and not word.lower().startswith(_AN_EXCEPTIONS)
        return f"{match.group(1)}{'n' if vowel else ''} {word}"

    return re.sub(r"\b([Aa])n? ([A-Za-z]\w*)", article, text)


def state_ensemble(class_name: str, states: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template x state for one class (WinCLIP's compositional ensemble), articles fixed.

    Args:
        class_name: the class, as a dataset writes it (``"metal_nut"`` reads "metal nut").
        states: state phrases, each with ``{}`` for the class name (``"damaged {}"``).
        templates: templates, each with ``{}`` for the state phrase (``"a photo of a {}."``).

    Returns:
        ``len(states) * len(templates)`` texts, state-major.

    >>> for text in state_ensemble("metal_nut", ["damaged {}", "unblemished {}"], ["a photo of a {}.", "a {}."]):
    ...     print(text)
    a photo of a damaged metal nut.
    a damaged metal nut.
    a photo of an unblemished metal nut.
    an unblemished metal nut.
    """
    name = class_text(class_name)
    return [fix_articles(template.format(state.format(name))) for state in states for template in templates]


class TextEncoder:
    """CLIP's frozen text tower: texts, or token embeddings with learned parts, to features.

    A view that owns no parameters (not an ``nn.Module``): the weights stay in the ``CLIPModel``.

    Shapes: token ids and embeddings are padded to the longest text, at most CLIP's 77-token context; the output is
    the projected EOT feature, ``(N, C)`` with C the joint embedding width.

    Args:
        clip: the frozen backbone whose text tower and ``text_projection`` are used.
        tokenizer: the backbone's tokenizer.
    """

    def __init__(self, clip: CLIPModel, tokenizer: CLIPTokenizer) -> None:
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        self.tokenizer = tokenizer
        self.context_length = int(clip.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        """The device of the text tower's weights (where token ids are put)."""
        return self.text_projection.weight.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the longest text; a text longer than the context is cut to it, keeping its EOT.

        Attention is causal, so padding after the last EOT never reaches an EOT feature: padding
        to the longest text instead of the context (77) changes no output, runs ~20 tokens
        instead of 77, and is decided on the host (no device sync to find the longest).

        Args:
            texts: N texts.

        Returns:
            (N, T) token ids on :attr:`device`, T <= 77 the longest text's length (with its EOT).
        """
        with _TOKENIZER_LOCK:
            batch = self.tokenizer(
                list(texts), padding="longest", truncation=True, max_length=self.context_length, return_tensors="pt"
            )
        return batch.input_ids.to(self.device)

    def eot_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the first EOT token of each sequence (pad == EOT in CLIP's tokenizer).

        Args:
            input_ids: (N, T) token ids.

        Returns:
            (N,) positions of each sequence's first EOT token.
        """
        return (input_ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings of token ids, before position embeddings.

        Args:
            input_ids: (N, T) token ids.

        Returns:
            (N, T, D) embeddings, D the text tower's width.
        """
        return self.text_model.embeddings.token_embedding(input_ids)

    def encode_embeddings(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Word embeddings (some of them learned) through the text tower to projected EOT features.

        Args:
            embeds: (N, T, D) word embeddings, before position embeddings (T <= 77, :meth:`tokenize`).
            eot_index: (N,) each sequence's EOT position (:meth:`eot_index`).

        Returns:
            (N, C) projected EOT features (not normalised); gradients reach ``embeds``.
        """
        hidden = self.text_model.embeddings(inputs_embeds=embeds)
        mask = causal_mask(self.text_model, hidden)
        hidden = self.text_model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = self.text_model.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot_index]
        return self.text_projection(pooled)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Plain texts to features, as ``CLIPModel.get_text_features``.

        Args:
            texts: N texts.
            batch_size: texts run through the tower at once.

        Returns:
            (N, C) features (not normalised).
        """
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids = self.tokenize(texts[start : start + batch_size])
            chunks.append(self.encode_embeddings(self.token_embeddings(ids), self.eot_index(ids)))
        return torch.cat(chunks)


@dataclass
class PromptFeatures:
    """Raw (unnormalised) text features of the prompts of a batch of classes.

    ``normal``: ``(n_classes, n_normal_adjectives, C)``; ``abnormal``: ``(n_classes, n_abnormal_adjectives, C)``.
    """

    normal: torch.Tensor
    abnormal: torch.Tensor

    def state_features(self) -> torch.Tensor:
        """The [normal, abnormal] directions of each class, adjectives averaged (:func:`mean_direction`).

        Returns:
            (n_classes, 2, C) L2-normalised [normal, abnormal] features.
        """
        return torch.stack([mean_direction(self.normal), mean_direction(self.abnormal)], dim=1)


def mean_direction(features: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Normalise each feature, average along ``dim``, normalise again (a prompt ensemble).

    Args:
        features: (..., n, ..., C) features, the ensemble's members along ``dim``.
        dim: the members' dimension (not the last one).

    Returns:
        ``features`` without ``dim``, e.g. (n, C) -> (C,), L2-normalised along the last dimension.

    >>> mean_direction(torch.tensor([[3.0, 4.0], [6.0, 8.0]]))
    tensor([0.6000, 0.8000])
    """
    return F.normalize(F.normalize(features, dim=-1).mean(dim=dim), dim=-1)


class PromptLearner(nn.Module):
    """Learnable normal/abnormal context vectors (LNPs and LAPs) and their text features.

    Args:
        config: the prompts' configuration (K = ``n_ctx``, adjectives, initial std).
        text_encoder: the frozen text tower the prompts run through (not a submodule).
    """

    def __init__(self, config: PromptConfig, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder  # a view of the frozen backbone, not a submodule
        width = text_encoder.text_model.embeddings.token_embedding.embedding_dim
        k = config.n_ctx
        self.ctx_normal = nn.Parameter(torch.randn(k, width) * config.ctx_init_std)  # N_1..N_K: (K, D)
        self.ctx_abnormal = nn.Parameter(torch.randn(k, width) * config.ctx_init_std)  # A_1..A_K: (K, D)

    def prompt_texts(self, class_name: str, abnormal: bool) -> list[str]:
        """The prompts' text with the K learnable slots shown as placeholders.

        Args:
            class_name: the class, as a dataset writes it.
            abnormal: the LAPs' adjectives (True) or the LNPs' (False).

        Returns:
            One text per adjective: ``"X X ... X <adjective> <class>."`` with K ``X``.
        """
        adjectives = self.config.abnormal_adjectives if abnormal else self.config.normal_adjectives
        prefix = " ".join([_PLACEHOLDER] * self.config.n_ctx)
        return [f"{prefix} {adjective} {class_text(class_name)}." for adjective in adjectives]

    def _encode_state(self, class_names: Sequence[str], ctx: torch.Tensor, abnormal: bool) -> torch.Tensor:
        texts = [t for name in class_names for t in self.prompt_texts(name, abnormal)]
        ids = self.text_encoder.tokenize(texts)  # (N, T)
        embeds = self.text_encoder.token_embeddings(ids)  # (N, T, D)
        k = self.config.n_ctx
        # Splice the context into positions 1..K (after SOT); concatenation, not in-place
        # assignment, so gradients flow to ctx and the frozen embeddings stay untouched.
        ctx = ctx.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        embeds = torch.cat([embeds[:, :1], ctx, embeds[:, 1 + k :]], dim=1)
        features = self.text_encoder.encode_embeddings(embeds, self.text_encoder.eot_index(ids))
        return features.view(len(class_names), -1, features.shape[-1])

    def forward(self, class_names: Sequence[str]) -> PromptFeatures:
        """Eq. 1's prompts of each class through the text tower, with gradients to the context vectors.

        Args:
            class_names: the n_classes classes.

        Returns:
            :class:`PromptFeatures`: ``normal`` (n_classes, n_normal_adjectives, C) and ``abnormal``
            (n_classes, n_abnormal_adjectives, C), raw.
        """
        return PromptFeatures(
            normal=self._encode_state(class_names, self.ctx_normal, abnormal=False),
            abnormal=self._encode_state(class_names, self.ctx_abnormal, abnormal=True),
        )

    def nearest_tokens(self, top_k: int = 3) -> dict[str, list[list[tuple[str, float]]]]:
        """For each context vector, the vocabulary tokens whose embeddings are closest (cosine).

        Args:
            top_k: tokens kept per context vector.

        Returns:
            ``{"normal": [[(token, similarity), ...] per vector], "abnormal": [...]}``: K lists of
            ``top_k`` pairs each, most similar first.
        """
        vocab = F.normalize(self.text_encoder.text_model.embeddings.token_embedding.weight, dim=-1)
        tokenizer = self.text_encoder.tokenizer
        result: dict[str, list[list[tuple[str, float]]]] = {}
        for state, ctx in (("normal", self.ctx_normal), ("abnormal", self.ctx_abnormal)):
            sims = F.normalize(ctx.detach().to(vocab.dtype), dim=-1) @ vocab.T  # (K, vocab)
            values, indices = sims.topk(top_k, dim=-1)
            result[state] = [
                [(tokenizer.decode([int(i)]).strip(), float(v)) for v, i in zip(vs, ix)]
                for vs, ix in zip(values, indices)
            ]
        return result
