"""Certified answers (issue 30): Clopper-Pearson, the Cohen core's soundness from first principles, and
certify_answer end to end on a tiny random-weight LLaVA.

The toy base classifiers act on pixels linearly, so P(h(x + e) = c) is known in closed form, and so is the
exact certified radius of the smoothed classifier g (the distance to the decision hyperplane).
"""


import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm

import fs_mllm
from fs_mllm.adapters.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, get_adapter
from fs_mllm.answer_certify import ABSTAIN_RADIUS, AnswerCertificate, certify_answer, certify_smoothed, predict_smoothed
from fs_mllm.answer_certify import _ModelAnswers, base_feature_path
from fs_mllm.patching import SmoothedFeatureFunction, get_fs_state
from fs_mllm.stats import clopper_pearson_lower
from fs_mllm.testing import build_llava

SIGMA = 0.25
SHAPE = (3, 4, 4)


# ---------------------------------------------------------------------------------------------
# (a) Clopper-Pearson
# ---------------------------------------------------------------------------------------------

def test_clopper_pearson_known_values():
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10), rel=1e-12)  # all successes
    assert clopper_pearson_lower(1000, 1000, 0.001) == pytest.approx(0.001 ** (1 / 1000), rel=1e-12)
    for k, n, alpha in [(1, 10, 0.05), (37, 50, 0.001), (990, 1000, 0.001), (500, 1000, 0.3)]:
        assert clopper_pearson_lower(k, n, alpha) == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12)
    # vectorised, monotone in k, below the point estimate
    ks = np.arange(0, 101)
    bounds = clopper_pearson_lower(ks, 100, 0.01)
    assert bounds.shape == (101,) and np.all(np.diff(bounds) > 0) and np.all(bounds <= ks / 100)


def test_clopper_pearson_coverage():
    rng = np.random.default_rng(0)
    trials, alpha = 20000, 0.05
    for p, n in [(0.3, 50), (0.9, 100), (0.99, 200)]:
        k = rng.binomial(n, p, size=trials)
        failures = int((clopper_pearson_lower(k, n, alpha) > p).sum())
        assert failures <= binom.ppf(1 - 1e-6, trials, alpha), (p, n, failures)


@pytest.mark.parametrize("k, n, alpha", [(-1, 10, 0.05), (11, 10, 0.05), (1, 0, 0.05), (1.5, 10, 0.05), (1, 10, 0.0), (1, 10, 1.0)])
def test_clopper_pearson_bad_input(k, n, alpha):
    with pytest.raises(ValueError):
        clopper_pearson_lower(k, n, alpha)


# ---------------------------------------------------------------------------------------------
# toy base classifiers with closed-form smoothed probabilities
# ---------------------------------------------------------------------------------------------

W = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
W_UNIT = W / W.norm()


def image_at(margin: float) -> torch.Tensor:
    """An image in [0,1] whose signed distance to the hyperplane <W_UNIT, x> = b is ``margin``, b = <W_UNIT, 0.5>."""
    return (torch.full(SHAPE, 0.5, dtype=torch.float64) + margin * W_UNIT).float()


B = float((W_UNIT * 0.5).sum())


def linear_answers(noisy: torch.Tensor) -> list[str]:
    """h(z) = "yes" if <w, z> > b else "no": P(h(x + e) = yes) = Phi(d(x) / sigma), d the signed distance."""
    projection = (noisy.double().flatten(1) @ W_UNIT.flatten())
    return ["yes" if value > B else "no" for value in projection.tolist()]


def three_way_answers(half_width: float):
    """"low" / "mid" / "high" by the projection: P(mid) = 2 Phi(half_width / sigma) - 1 at distance 0."""
    def answers(noisy: torch.Tensor) -> list[str]:
        projection = (noisy.double().flatten(1) @ W_UNIT.flatten()) - B
        return ["low" if v < -half_width else "high" if v > half_width else "mid" for v in projection.tolist()]
    return answers


def margin_for(p: float) -> float:
    return SIGMA * float(norm.ppf(p))


# ---------------------------------------------------------------------------------------------
# (b) soundness from first principles
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p_true, alpha", [(0.7, 0.05), (0.9, 0.05), (0.99, 0.05), (0.9, 0.001)])
def test_certificate_failure_rate_is_at_most_alpha(p_true, alpha):
    """Over 500 seeds, a certificate claiming a radius beyond the exact one (or a wrong answer) is rare: <= alpha."""
    x = image_at(margin_for(p_true))
    true_answer, true_radius = "yes", margin_for(p_true)  # g(x) = yes; g is constant exactly on d > 0
    seeds, failures, certified = 500, 0, 0
    for seed in range(seeds):
        cert = certify_smoothed(linear_answers, x, SIGMA, n0=20, n=200, alpha=alpha, batch_size=220, seed=seed)
        if cert.abstained:
            assert cert.answer is None and cert.radius == ABSTAIN_RADIUS
            continue
        certified += 1
        failures += cert.answer != true_answer or cert.radius > true_radius
    assert failures <= binom.ppf(1 - 1e-4, seeds, alpha), failures
    if p_true >= 0.9:
        assert certified >= 0.9 * seeds  # not vacuous: a clear majority certifies


def test_radius_matches_cohen_formula_and_is_batch_size_invariant():
    x = image_at(margin_for(0.9))
    a = certify_smoothed(linear_answers, x, SIGMA, n0=10, n=300, alpha=0.01, batch_size=7, seed=3)
    b = certify_smoothed(linear_answers, x, SIGMA, n0=10, n=300, alpha=0.01, batch_size=310, seed=3)
    assert a == b
    k = a.top_counts["yes"]
    assert a.p_a_lower == pytest.approx(beta.ppf(0.01, k, 300 - k + 1))
    assert a.radius == pytest.approx(SIGMA * norm.ppf(a.p_a_lower))
    assert a.radius < margin_for(0.9) and a.certified_at(a.radius) and not a.certified_at(a.radius + 1e-9)


def test_abstains_on_the_decision_boundary():
    """p_A = 1/2 exactly: a certificate may be issued in at most an alpha fraction of the runs."""
    x = image_at(0.0)
    runs, alpha = 200, 0.05
    issued = sum(not certify_smoothed(linear_answers, x, SIGMA, n0=20, n=200, alpha=alpha, seed=s).abstained
                 for s in range(runs))
    assert issued <= binom.ppf(1 - 1e-4, runs, alpha)


def test_abstains_when_the_top_answer_has_no_majority():
    """Three answers, the top one ("mid") with probability 0.45 < 1/2: g is "mid" but no radius is certifiable."""
    answers = three_way_answers(SIGMA * float(norm.ppf(0.725)))
    x = image_at(0.0)
    results = [certify_smoothed(answers, x, SIGMA, n0=50, n=300, alpha=0.01, seed=s) for s in range(40)]
    assert all(r.abstained and r.answer is None and r.radius == 0.0 for r in results)
    assert sum(r.selected == "mid" for r in results) >= 30  # PREDICT-phase selection still sees the plurality
    assert all(set(r.top_counts) <= {"low", "mid", "high"} for r in results)


def test_predict_smoothed():
    assert predict_smoothed(linear_answers, image_at(margin_for(0.95)), SIGMA, n=200, alpha=0.001) == "yes"
    assert predict_smoothed(linear_answers, image_at(-margin_for(0.95)), SIGMA, n=200, alpha=0.001) == "no"


# ---------------------------------------------------------------------------------------------
# (c) adaptive check: the worst-case perturbation inside the certified ball
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p_true", [0.8, 0.95, 0.999])
def test_worst_case_perturbation_inside_radius_keeps_the_answer(p_true):
    """For a linear h the strongest l2 attack on g moves straight across the hyperplane (along -w). At 0.95 x the
    certified radius g's answer (estimated with fresh samples, and exactly) is unchanged; at 1.05 x the exact
    radius the same attack does flip it, so the attack is not a weak one."""
    x = image_at(margin_for(p_true))
    for seed in range(5):
        cert = certify_smoothed(linear_answers, x, SIGMA, n0=50, n=1000, alpha=0.001, seed=seed)
        assert cert.answer == "yes"
        attacked = (x.double() - 0.95 * cert.radius * W_UNIT).float()
        exact = norm.cdf((margin_for(p_true) - 0.95 * cert.radius) / SIGMA)
        assert exact > 0.5
        fresh = certify_smoothed(linear_answers, attacked, SIGMA, n0=10, n=4000, alpha=0.001, batch_size=4000, seed=10_000 + seed)
        assert fresh.top_counts.get("yes", 0) > 2000  # fresh estimate of P(h(x' + e) = yes) > 1/2: g(x') = yes
    beyond = (x.double() - 1.05 * margin_for(p_true) * W_UNIT).float()
    assert predict_smoothed(linear_answers, beyond, SIGMA, n=4000, batch_size=4000, alpha=0.5) == "no"


def test_core_bad_input():
    x = image_at(0.1)
    for kwargs in ({"n0": 0}, {"n": 9}, {"n0": 50, "n": 20}, {"alpha": 0.5}, {"alpha": 0.0}, {"alpha": -1},
                   {"batch_size": 0}, {"seed": -1}):
        with pytest.raises(ValueError):
            certify_smoothed(linear_answers, x, SIGMA, **kwargs)
    with pytest.raises(ValueError, match="one str per noisy copy"):
        certify_smoothed(lambda z: ["a"], x, SIGMA, n0=5, n=10, batch_size=4)
    with pytest.raises(ValueError, match="image01"):
        certify_smoothed(linear_answers, (x * 255).to(torch.uint8), SIGMA)


# ---------------------------------------------------------------------------------------------
# (d) certify_answer end to end on a tiny random-weight LLaVA
# ---------------------------------------------------------------------------------------------

CANDIDATES = {"a": [5], "bb": [6, 7], "ccc": [8, 9, 10]}


class WordTokenizer:
    """A stand-in tokenizer: word "w<i>" <-> token i."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{int(i)}" for i in row if not (skip_special_tokens and int(i) == 0)) for row in ids]


@pytest.fixture(scope="module")
def tiny():
    model, inputs = build_llava(batch=3)
    fs_mllm.patch_model(model, sigma=SIGMA, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    inputs["pixel_values"] = get_adapter(model).pixels_to_model_inputs(model, images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)["pixel_values"]
    return model, inputs


def rows(inputs, order):
    return {k: v[list(order)] for k, v in inputs.items()}


def check_well_formed(cert, n, n0):
    assert isinstance(cert, AnswerCertificate)
    assert cert.n == n and cert.n0 == n0 and cert.sigma == SIGMA and cert.alpha == 0.001
    assert 0.0 <= cert.p_a_lower < 1.0
    assert sum(cert.top_counts.values()) <= n and cert.selected in cert.top_counts
    if cert.abstained:
        assert cert.answer is None and cert.radius == 0.0 and cert.p_a_lower <= 0.5
    else:
        assert cert.answer == cert.selected and cert.p_a_lower > 0.5
        assert cert.radius == pytest.approx(SIGMA * norm.ppf(cert.p_a_lower))


def test_closed_set_end_to_end(tiny):
    model, inputs = tiny
    certs = certify_answer(model, inputs, candidates=CANDIDATES, n0=4, n=12, batch_size=16, seed=1)
    assert len(certs) == 3
    for cert in certs:
        check_well_formed(cert, 12, 4)
        assert set(cert.top_counts) <= set(CANDIDATES)
    assert certify_answer(model, inputs, candidates=CANDIDATES, n0=4, n=12, batch_size=16, seed=1) == certs  # reproducible
    # batch position, neighbours and batch_size do not matter
    swapped = certify_answer(model, rows(inputs, (2, 0)), candidates=CANDIDATES, n0=4, n=12, batch_size=5, seed=1)
    assert swapped == [certs[2], certs[0]]
    # list of inputs = batched form
    assert certify_answer(model, [rows(inputs, (0,)), rows(inputs, (1, 2))], candidates=CANDIDATES,
                          n0=4, n=12, batch_size=16, seed=1) == certs
    # strings through a tokenizer = the same token ids
    by_text = certify_answer(model, rows(inputs, (0,)), candidates=["w5", "w6 w7", "w8 w9 w10"], tokenizer=WordTokenizer(),
                             n0=4, n=12, batch_size=16, seed=1)
    assert [c.top_counts for c in by_text] == [{"w" + " w".join(map(str, CANDIDATES[k])): v
                                                for k, v in certs[0].top_counts.items()}]
    assert fs_mllm.is_patched(model) and isinstance(get_fs_state(model).adapter.feature_owner(model).__dict__["get_image_features"],
                                                    SmoothedFeatureFunction)


def test_padding_is_removed_per_row(tiny):
    model, inputs = tiny
    one = rows(inputs, (1,))
    padded = {"input_ids": torch.cat([torch.zeros(1, 3, dtype=torch.long), one["input_ids"]], 1),
              "attention_mask": torch.cat([torch.zeros(1, 3, dtype=torch.long), one["attention_mask"]], 1),
              "pixel_values": one["pixel_values"]}
    kwargs = dict(candidates=CANDIDATES, n0=8, n=16, seed=2)
    assert certify_answer(model, padded, **kwargs) == certify_answer(model, one, **kwargs)


def test_candidate_scores_equal_full_forward_log_likelihood(tiny):
    """The KV-cache scoring (one prefill, continuations cropped back) gives each candidate's total log-likelihood
    of a plain full forward over prompt + candidate, on the single-copy (unsmoothed) feature path."""
    model, inputs = tiny
    from fs_mllm.answer_certify import _questions

    state = get_fs_state(model)
    questions, dtype = _questions(model, state, rows(inputs, (0,)))
    labels, token_ids = list(CANDIDATES), list(CANDIDATES.values())
    answers = _ModelAnswers(model, state, questions[0], dtype, labels=labels, token_ids=token_ids, tokenizer=None, max_new_tokens=1)
    noisy = (questions[0].image01 + SIGMA * torch.randn((3,) + tuple(questions[0].image01.shape),
                                                        generator=torch.Generator().manual_seed(0)))
    model_inputs = answers._inputs(noisy)
    with torch.inference_mode(), base_feature_path(model, state):
        scores = answers._scores(model_inputs)
        length = model_inputs["input_ids"].shape[1]
        for c, tokens in enumerate(token_ids):
            ids = torch.cat([model_inputs["input_ids"], torch.tensor(tokens).expand(3, -1)], 1)
            logits = model(**{**model_inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits.log_softmax(-1)
            expected = sum(logits[:, length - 1 + j, t] for j, t in enumerate(tokens))
            torch.testing.assert_close(scores[:, c].float(), expected, atol=1e-4, rtol=1e-4)
    # the single-copy path is the unsmoothed feature function (no booster here): not the n_samples average
    with torch.inference_mode():
        owner = state.adapter.feature_owner(model)
        with base_feature_path(model, state):
            single = owner.get_image_features(pixel_values=model_inputs["pixel_values"]).pooler_output
        with fs_mllm.patching.undefended(model):
            plain = owner.get_image_features(pixel_values=model_inputs["pixel_values"]).pooler_output
    torch.testing.assert_close(torch.stack(list(single)), torch.stack(list(plain)))


def test_open_set_end_to_end(tiny):
    model, inputs = tiny
    kwargs = dict(tokenizer=WordTokenizer(), n0=6, n=12, max_new_tokens=2, seed=4)
    certs = certify_answer(model, rows(inputs, (0, 1)), **kwargs)
    for cert in certs:
        check_well_formed(cert, 12, 6)
        assert all(len(answer.split()) <= 2 for answer in cert.top_counts)
    assert certify_answer(model, rows(inputs, (0, 1)), **kwargs) == certs
    assert certify_answer(model, rows(inputs, (1,)), **{**kwargs, "batch_size": 5}) == [certs[1]]


class CountingBooster:
    """A mapper that leaves features unchanged and counts the noisy copies it sees."""

    def __init__(self):
        self.rows = 0
        self.levels = set()

    def check_compatible(self, feature_dim, sigma):
        pass

    def map_features(self, features, sigma):
        self.rows += features.shape[0]
        self.levels.add(float(sigma))
        return features


def test_booster_is_part_of_the_certified_pipeline():
    model, inputs = build_llava(batch=1)
    booster = CountingBooster()
    fs_mllm.patch_model(model, sigma=SIGMA, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, booster=booster)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    inputs["pixel_values"] = get_adapter(model).pixels_to_model_inputs(model, images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)["pixel_values"]
    certify_answer(model, inputs, candidates=CANDIDATES, n0=4, n=10, batch_size=7)
    assert booster.rows == 14 and booster.levels == {SIGMA}  # one boosted feature row per noisy copy


class ModelCalled(AssertionError):
    pass


@pytest.fixture
def no_model_call(tiny):
    model, inputs = tiny

    def refuse(*args, **kwargs):
        raise ModelCalled("a model forward ran before the input was refused")

    handles = [module.register_forward_pre_hook(refuse) for module in (model, model.model.vision_tower)]
    yield model, inputs
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("change, match", [
    ({"candidates": []}, "at least two"),
    ({"candidates": {}}, "at least two"),
    ({"candidates": {"a": [5]}}, "at least two"),
    ({"candidates": ["w5", "w6", "w5"], "tokenizer": WordTokenizer()}, "duplicates"),
    ({"candidates": {"a": [5], "b": [5]}}, "same tokens"),
    ({"candidates": ["w5", "w6"]}, "tokenizer"),
    ({"candidates": {"a": [], "b": [6]}}, "token ids"),
    ({"candidates": {"a": [100], "b": [6]}}, "image token"),
    ({"n0": 30, "n": 20}, "n0=30 must be <= n=20"),
    ({"n": 9}, "n must be an integer >= 10"),
    ({"alpha": 0.5}, "alpha must lie in \\(0, 0.5\\)"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": 1.5}, "alpha"),
    ({"candidates": None}, "tokenizer"),
    ({"sigma": 0.0}, "sigma"),
    ({"batch_size": 0}, "chunk_size|batch_size"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_settings_raise_before_any_model_call(no_model_call, change, match):
    model, inputs = no_model_call
    kwargs = {"candidates": CANDIDATES, "n0": 4, "n": 10, **change}
    with pytest.raises(ValueError, match=match):
        certify_answer(model, inputs, **kwargs)


def test_bad_inputs_raise_before_any_model_call(no_model_call):
    model, inputs = no_model_call
    kwargs = {"candidates": CANDIDATES, "n0": 4, "n": 10}
    random_pixels = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"]) * 3}
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        certify_answer(model, random_pixels, **kwargs)
    with pytest.raises(ValueError, match="floating-point"):
        certify_answer(model, {**inputs, "pixel_values": (inputs["pixel_values"] * 50).to(torch.uint8)}, **kwargs)
    with pytest.raises(ValueError, match="input_ids"):
        certify_answer(model, {"pixel_values": inputs["pixel_values"]}, **kwargs)
    with pytest.raises(ValueError, match="one image per prompt"):
        certify_answer(model, {**inputs, "input_ids": inputs["input_ids"][:2], "attention_mask": inputs["attention_mask"][:2]}, **kwargs)
    # a later batch of a list is checked before the first one runs
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        certify_answer(model, [inputs, random_pixels], **kwargs)


def test_unpatched_model_is_refused_before_any_model_call():
    model, inputs = build_llava(batch=1)
    calls = []
    model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="not patched"):
        certify_answer(model, inputs, candidates=CANDIDATES)
    assert calls == []


def test_exported():
    assert fs_mllm.certify_answer is certify_answer and fs_mllm.AnswerCertificate is AnswerCertificate
    assert {"certify_answer", "AnswerCertificate"} <= set(fs_mllm.__all__)


# ---------------------------------------------------------------------------------------------
# (e) the adaptive attack on g through the real pipeline cannot move a certified answer inside its radius
# ---------------------------------------------------------------------------------------------

SINGLE_TOKEN = {"a": [5], "b": [6], "c": [7], "d": [8]}


@pytest.fixture(scope="module")
def image_driven():
    """A tiny LLaVA whose answer follows its image: the projector scaled up so image features dominate the
    decoder's input (at random scale every image gets the same answer, and no attack could move anything)."""
    model, inputs = build_llava(batch=8)
    with torch.no_grad():
        for weight in model.model.multi_modal_projector.parameters():
            weight.mul_(30.0)
    fs_mllm.patch_model(model, sigma=SIGMA, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    inputs["pixel_values"] = get_adapter(model).pixels_to_model_inputs(model, images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)["pixel_values"]
    return model, inputs


def test_adaptive_attack_inside_the_radius_never_changes_a_certified_answer(image_driven):
    """SmoothAdv PGD with EOT through each noisy copy's vision path and decoder (attack_answer), at 0.95 x each
    certified radius, then g at the attacked image estimated with fresh noise (predict_answer): the answer is the
    certified one or PREDICT abstains. The same attack at 3 x the radius does change g, so it has teeth."""
    from fs_mllm.answer_certify import attack_answer, predict_answer

    model, inputs = image_driven
    certs = certify_answer(model, inputs, candidates=SINGLE_TOKEN, n0=20, n=200, alpha=0.001, seed=1)
    certified = [b for b, c in enumerate(certs) if not c.abstained]
    assert len(set(certs[b].answer for b in certified)) >= 3  # the answers follow the images
    changed_beyond = 0
    for b in certified:
        one = {k: v[b:b + 1] for k, v in inputs.items()}
        for scale in (0.95, 3.0):
            adv = attack_answer(model, one, [certs[b].answer], candidates=SINGLE_TOKEN, eps=scale * certs[b].radius,
                                steps=10, eot_samples=16, seed=5)
            moved = get_adapter(model).model_inputs_to_pixels(model, adv["pixel_values"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
            start = get_adapter(model).model_inputs_to_pixels(model, one["pixel_values"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
            assert (moved - start).norm() <= scale * certs[b].radius * (1 + 1e-4) and 0 <= moved.min() and moved.max() <= 1
            predicted = predict_answer(model, adv, candidates=SINGLE_TOKEN, n=200, alpha=0.001, seed=99)[0]
            if scale < 1:
                assert predicted in (certs[b].answer, None), (b, certs[b], predicted)
            else:
                changed_beyond += predicted not in (certs[b].answer, None)
    assert changed_beyond >= 1


def test_attack_and_predict_refuse_bad_input_before_any_model_call(no_model_call):
    from fs_mllm.answer_certify import attack_answer, predict_answer

    model, inputs = no_model_call
    with pytest.raises(ValueError, match="eps"):
        attack_answer(model, inputs, ["a"] * 3, candidates=CANDIDATES, eps=0.0)
    with pytest.raises(ValueError, match="eps must be a number, got True"):
        attack_answer(model, inputs, ["a"] * 3, candidates=CANDIDATES, eps=True)
    with pytest.raises(ValueError, match="not candidates"):
        attack_answer(model, inputs, ["a", "a", "zz"], candidates=CANDIDATES, eps=0.1)
    with pytest.raises(ValueError, match="one candidate label per prompt"):
        attack_answer(model, inputs, ["a"], candidates=CANDIDATES, eps=0.1)
    with pytest.raises(ValueError, match="closed set"):
        attack_answer(model, inputs, ["a"] * 3, candidates=None, eps=0.1)
    with pytest.raises(ValueError, match="steps"):
        attack_answer(model, inputs, ["a"] * 3, candidates=CANDIDATES, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="alpha"):
        predict_answer(model, inputs, candidates=CANDIDATES, alpha=0.5)
    with pytest.raises(ValueError, match="n must"):
        predict_answer(model, inputs, candidates=CANDIDATES, n=0)


def test_attack_budget_holds_on_the_pixels_the_model_reads_in_half_precision(image_driven):
    """bfloat16 pixel_values round each pixel by far more than a small l2 budget allows: the returned pixels,
    decoded as the model reads them, stay within eps of the given ones (the step is shrunk until they do), and
    keep the given dtype."""
    from fs_mllm.answer_certify import attack_answer

    model, inputs = image_driven
    adapter = get_adapter(model)
    one = {k: v[:2] for k, v in inputs.items()}
    half = {**one, "pixel_values": one["pixel_values"].to(torch.bfloat16)}
    start = adapter.model_inputs_to_pixels(model, half["pixel_values"].float(), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    for eps in (0.05, 1.0):
        adv = attack_answer(model, half, ["a", "a"], candidates=SINGLE_TOKEN, eps=eps, steps=2, eot_samples=2, seed=5)
        assert adv["pixel_values"].dtype == torch.bfloat16
        moved = adapter.model_inputs_to_pixels(model, adv["pixel_values"].float(), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        distances = (moved - start).flatten(1).norm(dim=1)
        assert (distances <= eps).all(), (eps, distances)
    assert (distances > 0.5).all()  # at a budget bf16 can express, the attack still moves the pixels


def test_attack_refuses_images_of_different_sizes_before_any_model_call(no_model_call, monkeypatch):
    """attack_answer hands back one pixel_values tensor: images of different sizes (anyres families) are refused
    with the fix (one call per size) before the attack runs, not met by torch.stack after it."""
    import fs_mllm.answer_certify as answer_certify

    model, inputs = no_model_call
    questions = answer_certify._questions

    def one_bigger(*args, **kwargs):
        found, dtype = questions(*args, **kwargs)
        found[0].image01 = torch.nn.functional.interpolate(found[0].image01[None], scale_factor=2)[0]
        return found, dtype

    monkeypatch.setattr(answer_certify, "_questions", one_bigger)
    with pytest.raises(ValueError, match="different sizes .* once per image size"):
        answer_certify.attack_answer(model, inputs, ["a"] * 3, candidates=CANDIDATES, eps=0.1)
