"""Certified answers: randomized smoothing (Cohen et al. 2019, PREDICT / CERTIFY) over a patched MLLM's answer.

What is certified
-----------------
For one question (a prompt and its image x, [0,1] pixels at processor resolution) let h be the
*deterministic base answer function*: h(z) is the answer the model gives when its image is z, decoded from
the un-averaged feature path of that single image (the vision path of the model, the patch's booster
(denoiser before, mapper after) applied as deployed, then the language decoder). The *smoothed classifier*

    g(x) = argmax_c P_e( h(x + e) = c ),   e ~ N(0, sigma^2 I) in [0,1] pixel space (not clamped),

is what :func:`certify_answer` certifies. With probability >= 1 - alpha over its sampling noise, a
returned certificate that does not abstain guarantees g(x') = answer for every x' with
||x' - x||_2 < radius, radius = sigma * Phi^-1(p_A_lower) (Cohen et al., Thm 1), where p_A_lower is the
one-sided Clopper-Pearson lower bound on P(h(x + e) = answer). The guarantee is per question.

This is neither of the project's two other claims:

- **FCSB** (:func:`fs_mllm.certify_model`) bounds the cosine between the *smoothed features* F(x') and
  F(x); it says nothing about which answer the decoder produces from them.
- **generate()** on a patched model averages n0 (``FSConfig.n_samples``) noisy copies' unit features and
  decodes *once* from that average. That is a different function from g (g votes over the answers of
  single noisy copies); what generate() returns is not certified by this module, and g is not what
  generate() deploys. To deploy g, serve :func:`predict_answer` (Cohen's PREDICT) / the certificate's
  ``answer``; :func:`attack_answer` is the adaptive attack on g that a certificate is checked against.

h has two forms:

- closed set (``candidates`` given): h(z) = the candidate of highest *total* log-likelihood under the
  decoder, given the prompt and image z (no length normalisation). One prefill per noisy copy, the
  candidates scored from its KV cache.
- open set (``candidates=None``): h(z) = greedy decode (``max_new_tokens``) of the prompt with image z,
  decoded with the tokenizer and normalised by :func:`fs_mllm.answers.normalize_answer`.

The sampling and statistics core, :func:`certify_smoothed`, takes any ``answers_of(noisy_pixels) ->
list[str]``: :func:`certify_answer` supplies the model's, the soundness tests a toy classifier's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from . import stats
from .adapters.base import unwrap_model
from .answers import normalize_answer
from .config import (ANSWER_ATTACK_EOT_SAMPLES, ANSWER_ATTACK_STEPS, CertifyConfig, check_alpha, check_chunk_size, check_n,
                     check_seed, check_sigma)
from .smoothed_path import FSState, encoded_groups
from .smoothing import DEFAULT_CHUNK_SIZE, check_images, image_noise_seed

__all__ = ["AnswerCertificate", "attack_answer", "certify_answer", "certify_smoothed", "predict_answer", "predict_smoothed", "MIN_N", "ABSTAIN_RADIUS"]

AnswersOf = Callable[[torch.Tensor], Sequence[str]]

MIN_N = 10  # fewer estimation samples cannot certify anything useful at any reasonable alpha
ABSTAIN_RADIUS = 0.0  # the radius of an abstained certificate (its answer is None)
TOP_COUNTS = 5  # how many of the most frequent answers a certificate reports
# [0,1] decoding of pixel_values may miss the unit interval by rounding; beyond this it is an input error
_RANGE_TOLERANCE = {torch.float16: 4 / 255, torch.bfloat16: 4 / 255}
_FLOAT_RANGE_TOLERANCE = 1 / 255


@dataclass
class AnswerCertificate:
    """Cohen et al.'s CERTIFY for one question: the smoothed answer and the l2 radius it holds on.

    g(x) = argmax_c P(h(x + e) = c), e ~ N(0, sigma^2 I), is the smoothed answer classifier, h the answer
    the model gives from one noisy copy of the image (see ``certify_answer``).

    Attributes:
        answer: g's certified answer (a candidate label, or a normalised open-set answer); None when abstained.
        radius: l2 radius in [0,1] pixel space, sigma * Phi^-1(p_a_lower): g(x') = answer for every
            ||x' - x||_2 < radius, with probability >= 1 - alpha over the sampling. ABSTAIN_RADIUS (0.0)
            when abstained.
        p_a_lower: one-sided (1 - alpha) Clopper-Pearson lower bound on P(h(x + e) = selected).
        top_counts: answer -> count among the n estimation samples: the TOP_COUNTS most frequent, and
            ``selected``.
        abstained: p_a_lower <= 1/2 (no certificate).
        n: estimation samples.
        n0: selection samples.
        sigma: Gaussian noise std in [0,1] pixel space.
        alpha: failure probability.
        selected: the top answer c_A of the n0 selection samples (reported also when abstained).
        extra: cost accounting, e.g. ``decoder_forwards`` (model calls made); left out of ``==``.
    """

    answer: Optional[str]
    radius: float
    p_a_lower: float
    top_counts: dict
    abstained: bool
    n: int
    n0: int
    sigma: float
    alpha: float
    selected: Optional[str] = None
    extra: dict = field(default_factory=dict, compare=False)  # cost accounting (decoder_forwards); not compared

    def certified_at(self, radius: float) -> bool:
        """Whether this certificate covers every l2 perturbation of size ``radius``.

        For certified-accuracy curves, combine with whether ``answer`` is correct.

        Args:
            radius: l2 radius in [0,1] pixel space, >= 0.

        Returns:
            True when not abstained and ``self.radius >= radius``.
        """
        return not self.abstained and self.radius >= radius

    def to_dict(self) -> dict:
        """The certificate as JSON-serialisable data.

        Returns:
            {field name: value}, ``extra`` included.
        """
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# validation (every check runs before any model call)
# ---------------------------------------------------------------------------------------------

def _check_int(value: Any, name: str, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({what}), got {value!r}")
    return value


def check_counts(n0: Any, n: Any, alpha: Any) -> tuple[int, int, float]:
    """n0 >= 1 selection samples, n >= MIN_N estimation samples, n0 <= n, alpha in (0, 0.5)."""
    n0 = check_n(n0, "n0", minimum=1)
    n = check_n(n, "n", minimum=MIN_N)
    if n0 > n:
        raise ValueError(f"n0={n0} must be <= n={n}: n0 samples only select the answer, the n samples certify it; "
                         "lower n0 or raise n")
    alpha = check_alpha(alpha)
    if not alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5) (the certificate's failure probability, e.g. 0.001), got {alpha!r}")
    return n0, n, alpha


def _check_image(image01: Any) -> torch.Tensor:
    if not isinstance(image01, torch.Tensor) or not image01.is_floating_point():
        raise ValueError(f"image01 must be a floating-point tensor (..., 3, H, W) of [0,1] pixels, got "
                         f"{image01.dtype if isinstance(image01, torch.Tensor) else type(image01).__name__}")
    if image01.numel() == 0 or not torch.isfinite(image01).all():
        raise ValueError("image01 must be a non-empty tensor of finite pixels")
    return image01


# ---------------------------------------------------------------------------------------------
# the Cohen core: noise, counts, statistics
# ---------------------------------------------------------------------------------------------

def _noisy_chunks(image01: torch.Tensor, sigma: float, count: int, generator: torch.Generator,
                  batch_size: int) -> Iterator[torch.Tensor]:
    """Chunks (k, *image01.shape) of x + sigma * e in float32, copies drawn one by one from ``generator`` (so the
    values do not depend on ``batch_size``), not clamped to [0,1] (the Gaussian is the one smoothed over)."""
    base = image01.float()
    done = 0
    while done < count:
        k = min(batch_size, count - done)
        noisy = torch.empty((k,) + tuple(base.shape), dtype=torch.float32, device=base.device)
        for copy in noisy:
            copy.normal_(generator=generator)
        yield noisy.mul_(sigma).add_(base)
        done += k


def _count_answers(answers_of: AnswersOf, image01: torch.Tensor, sigma: float, count: int,
                   generator: torch.Generator, batch_size: int) -> Counter:
    counts: Counter = Counter()
    for noisy in _noisy_chunks(image01, sigma, count, generator, batch_size):
        answers = list(answers_of(noisy))
        if len(answers) != noisy.shape[0] or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"answers_of must return one str per noisy copy ({noisy.shape[0]}), got {answers!r:.200}")
        counts.update(answers)
    return counts


def _generator(image01: torch.Tensor, seed: int) -> torch.Generator:
    """The question's own noise stream: seeded from ``seed`` and the image (fs_mllm.smoothing.image_noise_seed)."""
    return torch.Generator(device=image01.device).manual_seed(image_noise_seed(seed, image01))


def certify_smoothed(
    answers_of: AnswersOf,
    image01: torch.Tensor,
    sigma: float,
    *,
    n0: int = CertifyConfig.n0,
    n: int = CertifyConfig.n,
    alpha: float = CertifyConfig.alpha,
    batch_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
) -> AnswerCertificate:
    """Cohen et al.'s CERTIFY of g(x) = argmax_c P(answers_of(x + e) = c), e ~ N(0, sigma^2 I), for one image.

    ``answers_of(noisy)`` maps a float32 batch (k, *image01.shape) of noisy copies (not clamped) to k answer
    strings, deterministically. ``n0`` copies select c_A (the most frequent answer; ties go to the first seen),
    ``n`` fresh copies count it, p_A_lower = Clopper-Pearson at level alpha, radius = sigma * Phi^-1(p_A_lower),
    abstain (answer None, radius ABSTAIN_RADIUS) when p_A_lower <= 1/2. Noise: one stream per image from
    ``seed`` and the image's pixels, n0 then n draws, so the result is reproducible and independent of
    ``batch_size`` (copies per answers_of call) and of other images. sigma is in the units of image01.
    """
    sigma = check_sigma(sigma)
    n0, n, alpha = check_counts(n0, n, alpha)
    batch_size = check_chunk_size(batch_size) or DEFAULT_CHUNK_SIZE
    seed = check_seed(seed)
    image01 = _check_image(image01)
    generator = _generator(image01, seed)
    selection = _count_answers(answers_of, image01, sigma, n0, generator, batch_size)
    selected = selection.most_common(1)[0][0]
    estimation = _count_answers(answers_of, image01, sigma, n, generator, batch_size)
    successes = estimation.get(selected, 0)
    p_lower = float(stats.clopper_pearson_lower(successes, n, alpha))
    abstained = not p_lower > 0.5
    from scipy.stats import norm  # imported on use: scipy.stats costs every `import fs_mllm` about a second

    radius = ABSTAIN_RADIUS if abstained else float(sigma * norm.ppf(p_lower))
    top = dict(estimation.most_common(TOP_COUNTS))
    top.setdefault(selected, successes)
    return AnswerCertificate(None if abstained else selected, radius, p_lower, top, abstained, n, n0, sigma, alpha,
                             selected=selected)


def predict_smoothed(answers_of: AnswersOf, image01: torch.Tensor, sigma: float, *, n: int = CertifyConfig.n0,
                     alpha: float = CertifyConfig.alpha, batch_size: int = DEFAULT_CHUNK_SIZE, seed: int = 0) -> Optional[str]:
    """Cohen et al.'s PREDICT: g(x), or None (abstain) when the top two answers' counts do not differ at level
    alpha (two-sided binomial test); returns a wrong answer with probability <= alpha. Same noise as
    :func:`certify_smoothed`'s first draws."""
    sigma = check_sigma(sigma)
    n = check_n(n, "n", minimum=1)
    alpha = check_alpha(alpha)
    batch_size = check_chunk_size(batch_size) or DEFAULT_CHUNK_SIZE
    image01 = _check_image(image01)
    counts = _count_answers(answers_of, image01, sigma, n, _generator(image01, check_seed(seed)), batch_size)
    top = counts.most_common(2) + [(None, 0)]
    (answer, count_a), (_, count_b) = top[0], top[1]
    from scipy.stats import binomtest  # imported on use: scipy.stats costs every `import fs_mllm` about a second

    return answer if binomtest(count_a, count_a + count_b, 0.5).pvalue <= alpha else None


# ---------------------------------------------------------------------------------------------
# the base answer function of a patched model
# ---------------------------------------------------------------------------------------------

class _BaseFeatureFunction:
    """Stands in for the patched image-feature function while h runs: each image's features come from ONE call
    of the original function on that image (its pixels are already the noisy copy), the booster applied as in
    the patched path (fs_mllm.smoothed_path.encoded_groups), no averaging. Keeps the original signature."""

    def __init__(self, model: nn.Module, original: Callable, state: FSState) -> None:
        functools.update_wrapper(self, original)
        self.model = model
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .patching import _STATE_ATTR, _bind_positional

        original, state, adapter = self.__wrapped__, self.state, self.state.adapter
        if args:
            kwargs = {**_bind_positional(original, args), **kwargs}
        live = self.model.__dict__.get(_STATE_ATTR)
        key = next((k for k in ("pixel_values",) + adapter.pixel_aliases if kwargs.get(k) is not None), None)
        if key is None or (live is not None and live.video_depth > 0 and not state.config.smooth_video):
            return original(**kwargs)
        pixel_values = kwargs[key]
        for name in ("pixel_values",) + adapter.pixel_aliases:
            kwargs.pop(name, None)
        return_dict = kwargs.pop("return_dict", True)
        template: list = []
        per_image: dict[int, torch.Tensor] = {}
        for indices, x, encode in encoded_groups(self.model, original, state, pixel_values, kwargs, template):
            for index, features in zip(indices, encode(x)):
                per_image[index] = features
        features = [per_image[i] for i in range(len(per_image))]
        return adapter.rebuild_output(template[0], features, return_dict, {"pixel_values": pixel_values, **kwargs})


@contextlib.contextmanager
def base_feature_path(model: nn.Module, state: FSState) -> Iterator[None]:
    """Within the block the patched model's image features are the single-copy (boosted) features of the pixels
    it is given (the base function h's path); the patched function comes back afterwards, also on error."""
    from .patching import original_feature_function, replaced_feature_function

    hf_model = unwrap_model(model)
    original = original_feature_function(hf_model, state.adapter)
    with replaced_feature_function(hf_model, state.adapter, lambda _: _BaseFeatureFunction(hf_model, original, state)):
        yield


@dataclass
class _Question:
    """One prompt row and its image, ready to build the inputs of k noisy copies."""

    image01: torch.Tensor  # (..., 3, H, W) float32 [0,1] on the model's device
    prompt_ids: torch.Tensor  # (L,) the row's tokens where attention_mask is 1
    image_rows: dict  # per-image kwargs (image_sizes, image_grid_thw) of this image
    row_kwargs: dict  # other per-prompt inputs, sliced to this row


class _ModelAnswers:
    """answers_of for one question of a patched model: closed set (score candidates) or open set (greedy)."""

    def __init__(self, model: nn.Module, state: FSState, question: _Question, pixel_dtype: torch.dtype, *,
                 labels: Optional[list[str]], token_ids: Optional[list[list[int]]], tokenizer: Any,
                 max_new_tokens: int) -> None:
        self.model, self.state, self.question, self.pixel_dtype = model, state, question, pixel_dtype
        self.labels, self.token_ids, self.tokenizer, self.max_new_tokens = labels, token_ids, tokenizer, max_new_tokens
        params = set(inspect.signature(model.forward).parameters)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_logits = "logits_to_keep" in params
        self.forwards = 0  # decoder forwards (prefills, continuations, generate calls)

    def _inputs(self, noisy: torch.Tensor) -> dict:
        q, k = self.question, noisy.shape[0]
        rows = {key: torch.stack([torch.as_tensor(row)] * k) for key, row in q.image_rows.items()}
        adapter = self.state.adapter
        image_inputs = adapter.pixels_to_model_inputs(self.model, noisy, self.state.image_mean, self.state.image_std, **rows)
        image_inputs["pixel_values"] = image_inputs["pixel_values"].to(self.pixel_dtype)
        ids = q.prompt_ids.unsqueeze(0).expand(k, -1)
        extra = {key: value.unsqueeze(0).expand((k,) + tuple(value.shape)) for key, value in q.row_kwargs.items()}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra, **image_inputs}

    def __call__(self, noisy: torch.Tensor) -> list[str]:
        inputs = self._inputs(noisy)
        with torch.inference_mode(), base_feature_path(self.model, self.state):
            if self.labels is None:
                return self._generate(inputs)
            scores = self._scores(inputs)
        return [self.labels[i] for i in scores.argmax(dim=1).tolist()]

    def differentiable_scores(self, noisy: torch.Tensor) -> torch.Tensor:
        """(k, C) total log-likelihood of each candidate, differentiable in ``noisy`` (the adaptive attack's):
        one forward over the prompt scores every candidate's first token; longer candidates get a full forward
        over prompt + candidate (no cache reuse, so autograd sees plain forwards)."""
        inputs = self._inputs(noisy)
        length = inputs["input_ids"].shape[1]
        with base_feature_path(self.model, self.state):
            first = self.model(**inputs).logits[:, -1].float().log_softmax(-1)
            columns = []
            for tokens in self.token_ids:
                total = first[:, tokens[0]]
                if len(tokens) > 1:
                    rest = torch.tensor(tokens, device=noisy.device).unsqueeze(0).expand(noisy.shape[0], -1)
                    ids = torch.cat([inputs["input_ids"], rest[:, :-1]], 1)
                    logits = self.model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
                    log_probs = logits[:, length:].float().log_softmax(-1)
                    total = total + log_probs.gather(-1, rest[:, 1:, None]).squeeze(-1).sum(-1)
                columns.append(total)
        self.forwards += 1
        return torch.stack(columns, dim=1)

    def _generate(self, inputs: dict) -> list[str]:
        self.forwards += 1
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [normalize_answer(text) for text in texts]

    def _scores(self, inputs: dict) -> torch.Tensor:
        """(k, C) total log-likelihood of each candidate: one prefill over the prompt, then each candidate's
        continuation from the prefill's KV cache (cropped back after each), or full forwards when the cache
        cannot be cropped (sliding-window / recurrent layers)."""
        k, length = inputs["input_ids"].shape
        kwargs = {"use_cache": True, **({"logits_to_keep": 1} if self.keep_logits else {})}
        out = self.model(**inputs, **kwargs)
        self.forwards += 1
        first = out.logits[:, -1].float().log_softmax(-1)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        croppable = (cache is not None and getattr(cache, "is_croppable", False)
                     and not any(getattr(cache, "is_sliding", [False])))
        device = inputs["input_ids"].device
        scores = torch.empty(k, len(self.token_ids), dtype=torch.float64)
        for c, tokens in enumerate(self.token_ids):
            total = first[:, tokens[0]].double()
            if len(tokens) > 1:
                rest = torch.tensor(tokens, device=device).unsqueeze(0).expand(k, -1)
                if croppable:
                    mask = torch.ones(k, length + len(tokens) - 1, dtype=inputs["attention_mask"].dtype, device=device)
                    step = self.model(input_ids=rest[:, :-1], attention_mask=mask, use_cache=True, **{self.cache_kw: cache})
                    logits = step.logits
                    cache.crop(-(len(tokens) - 1))
                else:
                    ids = torch.cat([inputs["input_ids"], rest[:, :-1]], 1)
                    full = self.model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
                    logits = full.logits[:, length:]
                self.forwards += 1
                log_probs = logits.float().log_softmax(-1)
                total = total + log_probs.gather(-1, rest[:, 1:, None]).squeeze(-1).double().sum(-1)
            scores[:, c] = total.cpu()
        return scores


def _resolve_tokenizer(processor: Any, tokenizer: Any) -> Any:
    if tokenizer is not None and processor is not None:
        raise ValueError("pass tokenizer= or processor= (whose .tokenizer is used), not both")
    if processor is not None:
        tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer


def _candidate_tokens(candidates: Any, tokenizer: Any, image_token: Optional[int]) -> tuple[list[str], list[list[int]]]:
    """(labels, token ids) from a list of strings (tokenised as given, appended right after the prompt, no
    special tokens: include a leading space where the tokenizer needs one) or a mapping label -> token ids."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, (Sequence, Mapping)):
        raise ValueError("candidates must be None (open set), a list of answer strings, or a dict answer -> token ids, "
                         f"got {type(candidates).__name__}")
    if len(candidates) < 2:
        raise ValueError(f"candidates holds {len(candidates)} answer(s); a closed set needs at least two (one answer "
                         "is certified at any radius), or candidates=None for open-set answers")
    if isinstance(candidates, Mapping):
        labels = list(candidates)
        token_ids = [candidates[label] for label in labels]
    else:
        labels = list(candidates)
        if not all(isinstance(label, str) for label in labels):
            raise ValueError("candidates given as a list must be strings; give token ids as a dict answer -> token ids")
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        if duplicated:
            raise ValueError(f"candidates has duplicates {duplicated}; pass each answer once")
        if tokenizer is None:
            raise ValueError("candidates given as strings need tokenizer= (or processor=) to tokenise them; or pass a "
                             "dict answer -> token ids")
        token_ids = [list(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels]
    if not all(isinstance(label, str) for label in labels):
        raise ValueError("candidates' answers (the dict keys) must be strings")
    checked = []
    for label, ids in zip(labels, token_ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        if (isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or len(ids) == 0
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            raise ValueError(f"candidates[{label!r}] must be a non-empty list of token ids (non-negative ints), got {ids!r}")
        if image_token is not None and image_token in ids:
            raise ValueError(f"candidates[{label!r}] holds the image token id {image_token}; candidates are answer text only")
        checked.append(list(ids))
    seen: dict = {}
    for label, ids in zip(labels, checked):
        if tuple(ids) in seen:
            raise ValueError(f"candidates {seen[tuple(ids)]!r} and {label!r} have the same tokens {ids}; "
                             "pass each answer once")
        seen[tuple(ids)] = label
    return labels, checked


def _questions(model: nn.Module, state: FSState, inputs: Any) -> tuple[list[_Question], torch.dtype]:
    """One _Question per prompt row; refuses inputs that are not processor outputs with float pixel values that
    decode into [0,1] with the patch's mean/std."""
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs or inputs.get("pixel_values") is None:
        raise ValueError("inputs must be processor outputs: a dict with input_ids, attention_mask and pixel_values "
                         "(one image per prompt), or a list of such dicts")
    adapter = state.adapter
    pixel_values, input_ids = inputs["pixel_values"], inputs["input_ids"]
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise ValueError(f"inputs['pixel_values'] must be a floating-point tensor (a processor's normalised pixels), got "
                         f"{pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__}; "
                         "run the processor on the images (uint8 images: pass them to the processor, not as pixel_values)")
    check_images(pixel_values, "inputs['pixel_values']", unit_range=False)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError("inputs['input_ids'] must be a (B, L) tensor of token ids")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask)
    per_image = set(adapter.per_image_kwargs)
    kwargs = {k: v for k, v in inputs.items() if k in per_image and v is not None}
    images = adapter.model_inputs_to_pixels(model, pixel_values.float(), state.image_mean, state.image_std, **kwargs)
    images = list(images)
    if len(images) != input_ids.shape[0]:
        raise ValueError(f"inputs hold {len(images)} images for {input_ids.shape[0]} prompts; certify_answer needs one "
                         "image per prompt")
    tolerance = _RANGE_TOLERANCE.get(pixel_values.dtype, _FLOAT_RANGE_TOLERANCE)
    low, high = min(float(i.min()) for i in images), max(float(i.max()) for i in images)
    if low < -tolerance or high > 1 + tolerance:
        raise ValueError(
            f"inputs['pixel_values'] decode to [{low:.3g}, {high:.3g}] in [0,1] pixel space with the patch's image_mean/"
            f"image_std, outside [0, 1]; pass processor outputs of real images made with the same mean/std as the patch "
            "(patch_model(model, processor=processor)), not random tensors")
    rows = adapter.per_image_rows(model, pixel_values, kwargs)
    skip = {"input_ids", "attention_mask", "pixel_values"} | per_image | set(adapter.pixel_aliases)
    device = pixel_values.device
    questions = []
    for b, image in enumerate(images):
        keep = mask[b].bool()
        row_kwargs = {}
        for key, value in inputs.items():
            if key in skip or not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != input_ids.shape[0]:
                continue
            row = value[b]
            row_kwargs[key] = row[keep] if row.ndim >= 1 and row.shape[0] == input_ids.shape[1] else row
        questions.append(_Question(image.float().clamp(0, 1).to(device), input_ids[b][keep],
                                   {key: rows[key][b] for key in rows}, row_kwargs))
    return questions, pixel_values.dtype


def certify_answer(
    model: nn.Module,
    inputs: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]],
    *,
    candidates: Union[Sequence[str], Mapping[str, Sequence[int]], None] = None,
    sigma: Optional[float] = None,
    n0: int = CertifyConfig.n0,
    n: int = CertifyConfig.n,
    alpha: Optional[float] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    processor: Any = None,
    tokenizer: Any = None,
    max_new_tokens: int = CertifyConfig.max_new_tokens,
) -> list[AnswerCertificate]:
    """Certified answers of a patched MLLM: Cohen et al.'s CERTIFY of the smoothed classifier g, per question.

    g(x) = argmax_c P(h(x + e) = c), e ~ N(0, sigma^2 I) in [0,1] pixel space, h the deterministic answer of one
    noisy copy (see the module docstring): the model's own vision path on that copy, the patch's booster, the
    decoder. Each returned certificate holds with probability >= 1 - alpha over this call's sampling: when not
    abstained, g(x') = answer for every ||x' - x||_2 < radius. This is not FCSB (a cosine bound on the smoothed
    features, ``fs_mllm.certify_model``) and not what ``generate()`` does (it decodes once from the n0-copy
    feature average; that function is not g).

    Args:
        model: a model patched with ``fs_mllm.patch_model`` (its image_mean/std and booster are used;
            its n_samples averaging is not: each copy is decoded on its own).
        inputs: processor outputs for B prompts with one image each (input_ids (B, L), attention_mask,
            float pixel_values and the family kwargs), or a list of such dicts (results concatenated).
            Padding is removed per row (attention_mask); other per-row tensors are sliced the same way.
        candidates: None = open set: greedy decoding (``max_new_tokens``), text via ``tokenizer``/``processor``,
            normalised with fs_mllm.answers.normalize_answer. A list of strings = closed set, tokenised with
            ``tokenizer`` (or ``processor.tokenizer``) without special tokens and appended right after the
            prompt (give the leading space your tokenizer expects); a dict answer -> token ids needs no
            tokenizer. h is the candidate of highest total log-likelihood (ties: the first listed).
        sigma: Gaussian noise std in [0,1] pixel space; default the patch's sigma (a booster is told this sigma,
            and checked against it when it differs from the patch's).
        n0: selection samples, >= 1 and <= n.
        n: estimation samples, >= MIN_N (10).
        alpha: failure probability, in (0, 0.5); default the patch's FSConfig.alpha.
        batch_size: noisy copies per decoder call (default the patch's chunk_size, else 32).
        seed: noise seed, 0 <= seed < 2**63; each question's stream is derived from it and its image, so a
            certificate does not depend on its batch position, its neighbours or batch_size.
        processor: the processor whose ``.tokenizer`` is used (not together with ``tokenizer``).
        tokenizer: the tokenizer for string candidates and open-set decoding.
        max_new_tokens: open set: tokens greedily decoded per noisy copy, >= 1.

    Returns:
        One ``AnswerCertificate`` per prompt, in order. Cost: n0 + n decoder prefills (closed set, plus
        one short continuation per multi-token candidate) or greedy decodes (open set) per question.

    Raises:
        ValueError: before any model call, for an unpatched model or a dual encoder; n0 > n, n < MIN_N,
            alpha outside (0, 0.5), sigma, seed, batch_size or max_new_tokens out of range; both ``processor``
            and ``tokenizer``; empty, duplicate or invalid candidates, or string candidates / open set
            without a tokenizer; inputs that are not processor outputs, with non-float pixel values, pixel
            values that do not decode into [0,1], or not one image per prompt.
    """
    n0, n, alpha = check_counts(n0, n, _patched(model).config.alpha if alpha is None else alpha)
    run = _prepare(model, inputs, candidates, sigma, batch_size, seed, processor, tokenizer, max_new_tokens)
    results = []
    for question, answers_of in run.questions():
        cert = certify_smoothed(answers_of, question.image01, run.sigma, n0=n0, n=n, alpha=alpha,
                                batch_size=run.batch_size, seed=run.seed)
        cert.extra["decoder_forwards"] = answers_of.forwards
        results.append(cert)
    return results


def predict_answer(
    model: nn.Module,
    inputs: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]],
    *,
    candidates: Union[Sequence[str], Mapping[str, Sequence[int]], None] = None,
    sigma: Optional[float] = None,
    n: int = CertifyConfig.n0,
    alpha: Optional[float] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    processor: Any = None,
    tokenizer: Any = None,
    max_new_tokens: int = CertifyConfig.max_new_tokens,
) -> list[Optional[str]]:
    """The smoothed classifier g's answer per question (Cohen et al.'s PREDICT), or None where it abstains.

    The deployed form of what :func:`certify_answer` certifies: ``n`` noisy copies answered one by one as there;
    the top answer is returned when its count beats the runner-up's in a two-sided binomial test at level
    ``alpha``, so a returned answer differs from g(x) with probability <= alpha.

    Args:
        model: a model patched with ``fs_mllm.patch_model`` (as for :func:`certify_answer`).
        inputs: processor outputs, one image per prompt (as for :func:`certify_answer`).
        candidates: None = open set (greedy decoding), else the closed set (as for :func:`certify_answer`).
        sigma: Gaussian noise std in [0,1] pixel space; default the patch's sigma.
        n: noisy copies per question, >= 1.
        alpha: the test's level, in (0, 0.5); default the patch's FSConfig.alpha.
        batch_size: noisy copies per decoder call (default the patch's chunk_size, else 32).
        seed: noise seed, 0 <= seed < 2**63 (the same streams as certify_answer's first draws).
        processor: the processor whose ``.tokenizer`` is used (not together with ``tokenizer``).
        tokenizer: the tokenizer for string candidates and open-set decoding.
        max_new_tokens: open set: tokens greedily decoded per noisy copy, >= 1.

    Returns:
        One answer (a candidate label or a normalised open-set answer) or None (abstain) per prompt, in order.

    Raises:
        ValueError: before any model call, on the bad input :func:`certify_answer` refuses (n >= 1 here).
    """
    n = check_n(n, "n", minimum=1)
    alpha = check_alpha(_patched(model).config.alpha if alpha is None else alpha)
    if not alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5) (the test's level, e.g. 0.001), got {alpha!r}")
    run = _prepare(model, inputs, candidates, sigma, batch_size, seed, processor, tokenizer, max_new_tokens)
    return [predict_smoothed(answers_of, question.image01, run.sigma, n=n, alpha=alpha, batch_size=run.batch_size,
                             seed=run.seed) for question, answers_of in run.questions()]


def attack_answer(
    model: nn.Module,
    inputs: Mapping[str, Any],
    answers: Sequence[str],
    *,
    candidates: Union[Sequence[str], Mapping[str, Sequence[int]]],
    eps: float,
    sigma: Optional[float] = None,
    steps: int = ANSWER_ATTACK_STEPS,
    eot_samples: int = ANSWER_ATTACK_EOT_SAMPLES,
    step_size: Optional[float] = None,
    seed: int = 0,
    processor: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """The adaptive attack on g (closed set): l2 PGD through the smoothed classifier itself, in pixel space.

    SmoothAdv's objective (Salman et al. 2019): minimise log of g's soft vote for ``answers[b]``, the mean over
    ``eot_samples`` fresh noisy copies of the softmax over the candidates' log-likelihoods, each copy run through
    the same single-copy path as :func:`certify_answer` (vision path, booster, decoder). It is what an attacker
    who knows the defence does; a certificate of radius r promises it cannot change g(x) within r.

    Args:
        model: a model patched with ``fs_mllm.patch_model``.
        inputs: processor outputs for B prompts, one image each (a dict, as for :func:`certify_answer`).
        answers: per prompt, the candidate label to push g away from (e.g. each certificate's answer).
        candidates: the closed set (as for :func:`certify_answer`).
        eps: l2 budget in [0,1] pixel space, > 0 (e.g. 0.95 x a certificate's radius).
        sigma: Gaussian noise std in [0,1] pixel space; default the patch's sigma.
        steps: PGD steps, >= 1.
        eot_samples: noisy copies per gradient, >= 1.
        step_size: l2 length of a step; default 2.5 * eps / steps.
        seed: the attack's own noise seed (not the certificate's).
        processor: the processor whose ``.tokenizer`` is used (not together with ``tokenizer``).
        tokenizer: the tokenizer for string candidates.

    Returns:
        ``inputs`` with ``pixel_values`` replaced by the adversarial images' (each within l2 ``eps`` of its
        [0,1] image, clamped to [0,1]), ready for :func:`predict_answer` / :func:`certify_answer`.

    Raises:
        ValueError: before any model call, on the bad input :func:`certify_answer` refuses, an answer that is not
            a candidate, one answer count per prompt missing, or eps, steps, eot_samples, step_size out of range.
    """
    from .arguments import check_float

    if not isinstance(inputs, Mapping):
        raise ValueError("inputs must be one dict of processor outputs (attack_answer returns it with new pixel_values)")
    if candidates is None:
        raise ValueError("candidates: attack_answer needs the closed set (its objective is the soft vote over candidates)")
    eps = check_float(eps, "eps")
    steps = _check_int(steps, "steps", 1, "PGD steps")
    eot_samples = _check_int(eot_samples, "eot_samples", 1, "noisy copies per gradient")
    step_size = 2.5 * eps / steps if step_size is None else check_float(step_size, "step_size")
    run = _prepare(model, inputs, candidates, sigma, None, seed, processor, tokenizer, 1)
    pairs = list(run.questions())
    if not isinstance(answers, str) and isinstance(answers, Iterable):
        answers = list(answers)  # a generator, a tuple
    if not isinstance(answers, list) or len(answers) != len(pairs):
        raise ValueError(f"answers must hold one candidate label per prompt ({len(pairs)}), got {answers!r:.200}")
    unknown = [a for a in answers if a not in run.labels]
    if unknown:
        raise ValueError(f"answers {unknown!r:.200} are not candidates {run.labels!r:.200}")
    shapes = sorted({tuple(question.image01.shape) for question, _ in pairs})
    if len(shapes) > 1:
        raise ValueError(f"inputs: attack_answer returns one pixel_values tensor, but the images have different sizes "
                         f"{shapes}; call it once per image size")
    generator = torch.Generator(device=pairs[0][0].image01.device).manual_seed(run.seed)
    adversarial = [_pgd_l2(answers_of, question.image01, run.labels.index(answer), run.sigma, eps, steps, eot_samples,
                           step_size, generator) for (question, answers_of), answer in zip(pairs, answers)]
    clean = torch.stack([question.image01 for question, _ in pairs])
    rows = {key: torch.stack([torch.as_tensor(q.image_rows[key]) for q, _ in pairs]) for key in pairs[0][0].image_rows}
    return {**inputs, "pixel_values": _encoded_within(run, inputs, rows, clean, torch.stack(adversarial) - clean, eps)}


def _encoded_within(run: "_Prepared", inputs: Mapping[str, Any], rows: dict, clean: torch.Tensor, delta: torch.Tensor,
                    eps: float, halvings: int = 20) -> torch.Tensor:
    """pixel_values of ``clean + t_b delta_b`` in the inputs' dtype, each t_b in [0, 1] the largest found (by
    bisection) whose stored pixels decode within l2 ``eps`` of the clean ones: rounding to float16 / bfloat16 moves
    a pixel by more than a small budget allows, so the budget is checked on what the model will read."""
    adapter, state, model = run.state.adapter, run.state, run.hf_model
    original = inputs["pixel_values"]
    per_image = {k: v for k, v in inputs.items() if k in set(adapter.per_image_kwargs) and v is not None}
    start = torch.stack(list(adapter.model_inputs_to_pixels(model, original.float(), state.image_mean, state.image_std,
                                                            **per_image))).to(clean.device)

    def encode(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = (clean + scale.view((-1,) + (1,) * (clean.ndim - 1)) * delta).clamp(0, 1)
        pixels = adapter.pixels_to_model_inputs(model, images, state.image_mean, state.image_std, **rows)["pixel_values"]
        pixels = pixels.to(dtype=original.dtype, device=original.device)
        read = torch.stack(list(adapter.model_inputs_to_pixels(model, pixels.float(), state.image_mean, state.image_std,
                                                               **per_image))).to(clean.device)
        return pixels, (read - start).flatten(1).norm(dim=1)

    low, high = torch.zeros(len(clean), device=clean.device), torch.ones(len(clean), device=clean.device)
    pixels, distance = encode(high)
    if bool((distance <= eps).all()):
        return pixels
    for _ in range(halvings):
        middle = (low + high) / 2
        inside = encode(middle)[1] <= eps
        low, high = torch.where(inside, middle, low), torch.where(inside, high, middle)
    pixels, distance = encode(low)
    if bool((distance > eps).any()):  # t = 0 stores the clean pixels again; anything else is a bug to surface
        raise RuntimeError(f"attack_answer: stored pixels {distance.tolist()} from the clean ones exceed eps {eps}")
    return pixels


def _pgd_l2(answers_of: "_ModelAnswers", image01: torch.Tensor, target: int, sigma: float, eps: float, steps: int,
            eot_samples: int, step_size: float, generator: torch.Generator) -> torch.Tensor:
    """l2 PGD on log(mean_j softmax(scores(x' + e_j))[target]), projected to the eps ball and [0,1]."""
    x = image01.float()
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        noise = torch.randn((eot_samples,) + tuple(x.shape), generator=generator, device=x.device) * sigma
        with torch.enable_grad():
            scores = answers_of.differentiable_scores((x + delta).unsqueeze(0) + noise)
            loss = scores.softmax(dim=1).mean(0)[target].clamp_min(1e-30).log()
            (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta - step_size * grad / grad.norm().clamp_min(1e-12)
            norm = delta.norm()
            if norm > eps:
                delta = delta * (eps / norm)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


class _Prepared(NamedTuple):
    hf_model: nn.Module
    state: FSState
    sigma: float
    batch_size: int
    seed: int
    labels: Optional[list[str]]
    prepared: list  # (questions, pixel dtype) per batch of inputs
    answers_for: Callable[[_Question, torch.dtype], "_ModelAnswers"]

    def questions(self) -> Iterator[tuple[_Question, "_ModelAnswers"]]:
        for questions, pixel_dtype in self.prepared:
            for question in questions:
                yield question, self.answers_for(question, pixel_dtype)


def _patched(model: nn.Module) -> FSState:
    from .patching import get_fs_state, is_patched

    hf_model = unwrap_model(model)
    if not is_patched(hf_model):
        raise ValueError("model is not patched; call fs_mllm.patch_model(model, sigma=..., processor=...) first "
                         "(certify_answer certifies the patched pipeline, booster included)")
    return get_fs_state(hf_model)


def _prepare(model: nn.Module, inputs: Any, candidates: Any, sigma: Any, batch_size: Any, seed: Any, processor: Any,
             tokenizer: Any, max_new_tokens: Any) -> _Prepared:
    """Every check of certify_answer / predict_answer / attack_answer's shared arguments, before any model call,
    and the questions with their base answer function h."""
    hf_model = unwrap_model(model)
    patched = _patched(hf_model)
    sigma = patched.config.sigma if sigma is None else check_sigma(sigma)
    seed = check_seed(seed)
    batch_size = check_chunk_size(batch_size) or patched.config.chunk_size or DEFAULT_CHUNK_SIZE
    max_new_tokens = _check_int(max_new_tokens, "max_new_tokens", 1, "tokens greedily decoded per noisy copy")
    if not patched.adapter.generates:
        raise ValueError(f"model: certify_answer needs a generative MLLM, got {type(hf_model).__name__}; "
                         "for dual encoders use fs_mllm.certify_zero_shot")
    tokenizer = _resolve_tokenizer(processor, tokenizer)
    image_token = getattr(hf_model.config, "image_token_id", None) or getattr(hf_model.config, "image_token_index", None)
    labels = token_ids = None
    if candidates is not None:
        labels, token_ids = _candidate_tokens(candidates, tokenizer, image_token)
    elif tokenizer is None or not callable(getattr(tokenizer, "batch_decode", None)):
        raise ValueError("candidates=None (open set) decodes answers to text: pass tokenizer= or processor= "
                         "(with batch_decode), or give candidates")
    if booster_check := getattr(patched.booster, "check_compatible", None):
        if sigma != patched.config.sigma:
            booster_check(patched.adapter.feature_dim(hf_model), sigma)
    state = FSState(patched.config.replace(sigma=sigma), patched.adapter, patched.image_mean, patched.image_std,
                    patched.booster)
    batches = [inputs] if isinstance(inputs, Mapping) else list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not batches:
        raise ValueError("inputs is an empty list; pass processor outputs")
    prepared = [_questions(hf_model, state, batch) for batch in batches]  # every input checked before any model call

    def answers_for(question: _Question, pixel_dtype: torch.dtype) -> _ModelAnswers:
        return _ModelAnswers(hf_model, state, question, pixel_dtype, labels=labels, token_ids=token_ids,
                             tokenizer=tokenizer, max_new_tokens=max_new_tokens)

    return _Prepared(hf_model, state, sigma, batch_size, seed, labels, prepared, answers_for)
