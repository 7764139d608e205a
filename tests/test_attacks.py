"""PGD attacks (fs_mllm.attacks) and the attack recipe on a tiny random-weight LLaVA built from its config.

Run with ``python -m pytest tests/test_attacks.py`` from the repository root. The processor (CLIP image
processor + a character-level tokenizer whose ``<image>`` id is the tiny model's image token) is built
in code, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch


from fs_mllm.attacks import AttackConfig, attack, build_text_inputs, eot_gradient, image_features, make_objective, project
from fs_mllm.certify import certify_model
from fs_mllm.patching import patch_model, unpatch_model
from fs_mllm.smoothing import smoothed_mean
from fs_mllm.evaluation.robustness import targeted_success

from fs_mllm.testing import IMAGE_TOKEN, build_llava, build_qwen2_vl, vision_module

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
SIZE = 32


def tiny_processor():
    """LlavaProcessor for the tiny LLaVA: 32 px CLIP preprocessing, characters as tokens, <image> = IMAGE_TOKEN."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:'\n":
        vocab[char] = len(vocab)
    vocab["<image>"] = IMAGE_TOKEN
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # lower-case, and drop characters outside the vocabulary (as some real tokenizers do)
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z0-9 .,?!:'\n<>]"), "")])
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                         image_mean=MEAN, image_std=STD)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    m, _ = build_llava()
    return m


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth-ish [0,1] images (a blurred random field), closer to photos than white noise."""
    noise = torch.rand(batch, 3, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(noise, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


# ---------------------------------------------------------------------------------------------
# configuration and projections
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(eps=0), "eps"), (dict(eps=-1), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(norm="l1"), "norm"), (dict(objective="confuse"), "objective"),
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(step_size=0), "step_size"),
    (dict(eot_samples=0), "eot_samples"), (dict(eot_chunk_size=0), "eot_chunk_size"),
    (dict(objective="targeted"), "target_text"), (dict(objective="targeted", target_text="   "), "target_text"),
    (dict(seed=-1), "seed"), (dict(smoothing_samples=0), "smoothing_samples"),
])
def test_config_rejects_bad_values_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AttackConfig(**kwargs)


def test_config_defaults_and_dict():
    config = AttackConfig(eps=0.5, steps=10)
    assert config.step_size == pytest.approx(2.5 * 0.5 / 10)
    assert AttackConfig(**config.to_dict()) == config
    json.dumps(config.to_dict())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_project_holds_ball_and_pixel_range(norm):
    x = images(4, seed=3)
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 3
    eps = 0.7 if norm == "l2" else 0.05
    out = project(delta, x, norm, eps)
    size = out.flatten(1).norm(dim=1) if norm == "l2" else out.flatten(1).abs().amax(dim=1)
    assert (size <= eps + 1e-6).all()
    assert ((x + out) >= 0).all() and ((x + out) <= 1).all()
    assert (size > 0.5 * eps).all()  # it projects, it does not zero the perturbation


# ---------------------------------------------------------------------------------------------
# unpatched model: the feature attack works and the constraints hold at every step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, eps", [("l2", 3.0), ("linf", 16 / 255)])
def test_feature_attack_lowers_fcs_within_budget(model, norm, eps):
    x = images()
    config = AttackConfig(norm=norm, eps=eps, steps=10, objective="feature", record_steps=True, seed=1)
    result = attack(model, None, x, None, config, image_mean=MEAN, image_std=STD)
    assert len(result.steps) == config.steps
    for record in result.steps:  # the projection held after every single step
        assert max(record.delta_norm) <= eps + 1e-6
        assert record.pixel_min >= 0.0 and record.pixel_max <= 1.0
    assert ((result.adv_images >= 0) & (result.adv_images <= 1)).all()
    size = (result.adv_images - x).flatten(1)
    size = size.norm(dim=1) if norm == "l2" else size.abs().amax(dim=1)
    assert (size <= eps + 1e-6).all()
    # the clean FCS is 1; the attack drives it well below that
    assert max(result.fcs) < 0.7, result.fcs
    # and the reported FCS is the cosine of the features the decoder sees
    with torch.no_grad():
        measured = cos(image_features(model, result.adv_images, MEAN, STD), image_features(model, x, MEAN, STD))
    assert torch.allclose(measured, torch.tensor(result.fcs), atol=1e-5)
    # the loss went down along the way
    assert result.steps[-1].loss < result.steps[0].loss


def test_attack_rejects_bad_inputs(model):
    config = AttackConfig(eps=0.5, steps=1)
    with pytest.raises(ValueError, match="images01"):
        attack(model, None, images() * 2, None, config, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="images01"):
        attack(model, None, images()[0], None, config, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="config"):
        attack(model, None, images(), None, {"eps": 0.5}, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="prompts"):
        attack(model, None, images(), None, AttackConfig(objective="targeted", target_text="dog", steps=1),
               image_mean=MEAN, image_std=STD)


def test_target_text_that_tokenises_to_nothing_is_an_error(model, processor):
    assert processor.tokenizer("\u2603\u2603", add_special_tokens=False)["input_ids"] == []  # dropped characters
    config = AttackConfig(objective="targeted", target_text="\u2603\u2603", steps=1)  # non-blank, so the config accepts it
    with pytest.raises(ValueError, match="target_text.*tokenises to nothing"):
        attack(model, processor, images(1), ["<image>what is it?"], config, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        build_text_inputs(processor, images(1), ["<image>what is it?"], [""])
    ok = AttackConfig(objective="targeted", target_text="A Dog", steps=1)
    result = attack(model, processor, images(1), ["<image>what is it?"], ok, image_mean=MEAN, image_std=STD)
    assert len(result.fcs) == 1


# ---------------------------------------------------------------------------------------------
# text objectives
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["targeted", "untargeted"])
def test_text_objectives_move_their_loss(model, processor, objective):
    x = images(2, seed=5)
    prompts = ["<image>what is in the picture?", "<image>describe it."]
    config = AttackConfig(norm="linf", eps=16 / 255, steps=8, objective=objective, target_text="a photo of a dog", seed=2)
    answers = ["a red car", "two cats on a sofa"] if objective == "untargeted" else None
    objective_fn, _ = make_objective(model, processor, x, prompts, config, answers, MEAN, STD)
    with torch.no_grad():
        clean_loss = objective_fn(x)
    result = attack(model, processor, x, prompts, config, answers=answers, image_mean=MEAN, image_std=STD)
    with torch.no_grad():
        adv_loss = objective_fn(result.adv_images)
    # targeted: CE(target) goes down; untargeted: -CE(answer) goes down, i.e. CE(answer) goes up
    assert (adv_loss < clean_loss - 1e-3).all(), (clean_loss, adv_loss)
    assert result.final_loss == pytest.approx(float(adv_loss.mean()), abs=1e-4)


def test_text_inputs_label_only_the_continuation(processor):
    text = build_text_inputs(processor, images(2), ["<image>hi", "<image>a longer prompt"], ["dog", "a cat"])
    assert (text["input_ids"] == IMAGE_TOKEN).sum(1).tolist() == [16, 16]
    labelled = (text["labels"] != -100).sum(1).tolist()
    assert labelled == [3, 5]
    decoded = processor.tokenizer.decode(text["labels"][1][text["labels"][1] != -100])
    assert decoded == "a cat"
    assert (text["attention_mask"].sum(1) == (text["input_ids"] != 0).sum(1)).all()


# ---------------------------------------------------------------------------------------------
# patched model: EOT gradients, chunking, and the certificate surviving the adaptive attack
# ---------------------------------------------------------------------------------------------

def test_eot_chunks_give_the_same_gradient_and_bound_live_graphs(model):
    x = images(1, seed=7)
    patch_model(model, sigma=0.25, n_samples=4, image_mean=MEAN, image_std=STD)
    try:
        base = AttackConfig(eps=0.5, steps=2, eot_samples=4, seed=3)
        objective, _ = make_objective(model, None, x, None, base, image_mean=MEAN, image_std=STD)
        at_backward: list[int] = []
        calls = [0]

        def counted(adv):
            loss = objective(adv)
            calls[0] += 1
            # fires during backward: how many forwards had run by then
            loss.register_hook(lambda grad: at_backward.append(calls[0]))
            return loss

        results = {}
        for chunk in (None, 1, 3):
            config = AttackConfig(eps=0.5, steps=2, eot_samples=4, eot_chunk_size=chunk, seed=3)
            at_backward.clear()
            calls[0] = 0
            results[chunk] = eot_gradient(model, counted, x, config, step=0)
            # graphs alive at a backward: forwards since the previous backward
            alive = [b - a for a, b in zip([0] + sorted(set(at_backward))[:-1], sorted(set(at_backward)))]
            assert max(alive) == (chunk or 4), (chunk, alive)
        loss_all, grad_all = results[None]
        for chunk in (1, 3):
            loss_c, grad_c = results[chunk]
            assert torch.allclose(loss_c, loss_all, atol=1e-6)
            assert torch.allclose(grad_c, grad_all, rtol=1e-4, atol=1e-7 * grad_all.abs().max().item())
        # fresh noise every step: a different step gives a different Monte-Carlo gradient
        _, grad_next = eot_gradient(model, objective, x, base, step=1)
        assert not torch.allclose(grad_next, grad_all, rtol=1e-3)
        # and the patch's own seed is restored afterwards (deterministic deployment)
        with torch.no_grad():
            first = image_features(model, x)
            second = image_features(model, x)
        assert torch.equal(first, second)
    finally:
        unpatch_model(model)


def test_certificate_survives_the_adaptive_attack(model):
    sigma = 0.25
    x = images(2, seed=11)
    patch_model(model, sigma=sigma, n_samples=4, image_mean=MEAN, image_std=STD)
    try:
        certificates = certify_model(model, x, n=1000, alpha=0.001)
        # attack at the radius where the certificate still promises cos >= 0.25 (non-vacuous)
        eps = min(c.radius(threshold=0.25) for c in certificates)
        assert eps > 0.02, [c.score_lower for c in certificates]
        bounds = [c.fcsb(eps) for c in certificates]
        assert min(bounds) >= 0.25 - 1e-9
        sizes: list[int] = []
        hook = vision_module(model).register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
        config = AttackConfig(norm="l2", eps=eps, steps=10, objective="feature", eot_samples=4, eot_chunk_size=2,
                              smoothing_samples=16, seed=4)
        try:
            result = attack(model, None, x, None, config)
        finally:
            hook.remove()
        # the attack differentiated through the smoothed path with 16 noisy copies per forward
        assert 16 * x.shape[0] in sizes and 4 * x.shape[0] in sizes
    finally:
        unpatch_model(model)
    assert max(result.delta_norm) <= eps + 1e-6

    # cos(F(x'), F(x)) of the exact smoothed encoder, estimated with many samples on the base feature path
    def encode(z):
        return image_features(model, z, MEAN, STD)

    with torch.no_grad():
        f_adv = smoothed_mean(encode, result.adv_images, sigma, 2000, seed=123, chunk_size=500).mean_unit
        f_clean = smoothed_mean(encode, x, sigma, 2000, seed=456, chunk_size=500).mean_unit
        f_base_adv = encode(result.adv_images)
        f_base = encode(x)
    measured = cos(f_adv, f_clean)
    for m, bound in zip(measured.tolist(), bounds):
        assert m >= bound, (m, bound)
    # the attack did move the smoothed features (it is not a no-op that passes trivially)
    assert (measured < 0.9999).all()
    assert (cos(f_base_adv, f_base) < 1.0).all()
    print(f"eps={eps:.4f} bounds={bounds} measured={measured.tolist()} fcs(patched path)={result.fcs}")


def test_qwen2_vl_attacks_through_patch_flattening():
    """Qwen2-VL: [0,1] images -> normalise -> patch rows (+ image_grid_thw) inside the gradient path."""
    qwen, inputs = build_qwen2_vl()
    x = images(2, seed=13)[..., :16, :16]
    result = attack(qwen, None, x, None, AttackConfig(norm="l2", eps=2.0, steps=8, seed=0), image_mean=MEAN, image_std=STD)
    assert max(result.fcs) < 0.8, result.fcs

    class CharTokenizer:  # token ids for text appended to the hand-made Qwen prompts
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + ord(c) % 80 for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids.tolist())

    prompts = {k: inputs[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    config = AttackConfig(norm="linf", eps=32 / 255, steps=6, objective="targeted", target_text="a dog", seed=1)
    objective, _ = make_objective(qwen, CharTokenizer(), x, prompts, config, image_mean=MEAN, image_std=STD)
    with torch.no_grad():
        clean_loss = objective(x)
    adv = attack(qwen, CharTokenizer(), x, prompts, config, image_mean=MEAN, image_std=STD)
    with torch.no_grad():
        assert (objective(adv.adv_images) < clean_loss).all()
    patch_model(qwen, sigma=0.25, n_samples=2, image_mean=MEAN, image_std=STD)
    smoothed = attack(qwen, CharTokenizer(), x, prompts, AttackConfig(**{**config.to_dict(), "steps": 2, "eot_samples": 2}))
    assert all(-1 <= f <= 1 + 1e-6 for f in smoothed.fcs)


# ---------------------------------------------------------------------------------------------
# the recipe, end to end on a tiny model saved to a folder
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory, processor):
    """A tiny LLaVA and its processor saved as a regular HF folder (what from_pretrained loads)."""
    m, _ = build_llava(batch=1)
    folder = tmp_path_factory.mktemp("models") / "tiny-llava"
    m.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _recipe():
    from fs_mllm.commands import attack  # recipes/attack_pipeline.py and `fs-mllm attack` run its main

    return attack


def test_attack_pipeline_recipe(tmp_path, saved_model_dir, capsys):
    from PIL import Image

    attack_pipeline = _recipe()
    model_dir = saved_model_dir
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for i in range(2):
        array = (images(1, seed=20 + i)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).resize((48, 40)).save(image_dir / f"img{i}.png")  # the processor resizes/crops
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--images", str(image_dir), "--question", "what is it?",
            "--prompt-template", "{image}{question}", "--objective", "targeted", "--target-text", "a dog",
            "--norm", "linf", "--eps", str(8 / 255), "--steps", "2", "--eot-samples", "2", "--modes", "base,fs",
            "--n-samples", "2", "--max-new-tokens", "4", "--out", str(out)]
    assert attack_pipeline.main(argv) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 2 images x 2 modes
    rows = [json.loads(line) for line in lines]
    assert {r["mode"] for r in rows} == {"base", "fs"}
    for row in rows:
        assert -1.0 <= row["fcs"] <= 1.0 + 1e-6
        assert row["delta_norm"] <= 8 / 255 + 1e-6
        on_target_before = targeted_success(row["clean_output"], "a dog")
        assert row["success"] is None if on_target_before else isinstance(row["success"], bool)
        assert os.path.isfile(row["adv_image"])
        saved = Image.open(row["adv_image"])
        assert saved.size == (SIZE, SIZE)  # processor resolution, not the file's
    printed = capsys.readouterr().out
    assert "| mode" in printed and "fs" in printed
    # append-safe: a second run adds lines, it does not overwrite
    assert attack_pipeline.main(argv + ["--seed", "1"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 8


def test_attack_pipeline_on_offline_vqa(tmp_path, saved_model_dir):
    from fs_mllm.evaluation.vqa import vqa_score

    out = tmp_path / "out"
    argv = ["--model", str(saved_model_dir), "--offline-eval", "vqa", "--limit", "1", "--prompt-template",
            "{image}{question}", "--objective", "untargeted", "--norm", "l2", "--eps", "0.5", "--steps", "1",
            "--modes", "base", "--max-new-tokens", "3", "--out", str(out)]
    assert _recipe().main(argv) == 0
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["answers"] and row["question"].endswith("?")
    # untargeted VQA success = a right answer (score > 0) turned wrong (score 0); None: wrong before the attack
    if vqa_score(row["clean_output"], row["answers"]) == 0.0:
        assert row["success"] is None
    else:
        assert row["success"] == (vqa_score(row["adv_output"], row["answers"]) == 0.0)
    assert row["delta_norm"] <= 0.5 + 1e-6


def test_attack_pipeline_rejects_bad_arguments(tmp_path, saved_model_dir, capsys):
    recipe = _recipe()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model", str(saved_model_dir), "--out", str(tmp_path), "--modes", "base,fancy"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model", str(saved_model_dir), "--out", str(tmp_path), "--modes", "fs+gsb"])
    with pytest.raises(SystemExit) as exc:  # checked while parsing, before the model loads
        recipe.main(["--model", str(saved_model_dir), "--out", str(tmp_path), "--eps", "0"])
    assert exc.value.code == 2 and "--eps" in capsys.readouterr().err


# The settings keys of rows written before fs-mllm attack had a Python API (computed at 13ad73e with the
# Namespace the command parsed): a folder written then must resume, so the same options give the same key.
SETTINGS_IDS_BEFORE_THE_API = [
    (["--out", "x"], "b9e9d2f6840b"),
    (["--model", "m", "--offline-eval", "vqa", "--eps", "0.03", "--norm", "linf", "--steps", "3", "--modes", "base,fs",
      "--sigma", "0.125", "--n-samples", "4", "--out", "x"], "b41fa3ddfd91"),
    (["--protocol", "transfer", "--surrogates", "dinov2-cls112,dinov2", "--ensemble-weighting", "gradient", "--out", "y",
      "--max-new-tokens", "5", "--seed", "3", "--question", "Q?", "--prompt-template", "{image} {question}",
      "--crop-scale", "0.5,0.9", "--crop-views", "2", "--crop-full-view"], "3c224a3a2deb"),
]


@pytest.mark.parametrize("argv, expected", SETTINGS_IDS_BEFORE_THE_API)
def test_attack_rows_keep_their_settings_key(argv, expected):
    from fs_mllm.evaluation.attack_pipeline import settings_id

    assert settings_id(_recipe().parse_args(argv)) == expected


def test_attack_run_from_python_is_the_command(tmp_path):
    """AttackRun built in Python is the run the command line parses to (same key, same checks)."""
    from fs_mllm.attacks import AttackConfig
    from fs_mllm.evaluation.attack_pipeline import AttackRun, settings_id

    run = AttackRun(out="x", model="m", offline_eval="vqa", modes="base,fs", sigma=0.125, n_samples=4,
                    attack=AttackConfig(eps=0.03, norm="linf", steps=3))
    assert settings_id(run) == "b41fa3ddfd91" and run.modes == ("base", "fs")
    assert AttackRun(out="x").attack.steps == _recipe().build_parser().get_default("steps")


@pytest.mark.parametrize("fields, needle", [
    ({"modes": "base,fancy"}, "modes must be a comma-separated subset"),
    ({"modes": ()}, "modes must name at least one"),
    ({"modes": "base,fs,base"}, "modes must not repeat"),
    ({"modes": ("fs+gsb",)}, "modes fs+gsb needs booster"),
    ({"booster": "/no/such/booster"}, "booster: '/no/such/booster' is not a folder"),
    ({"images": "/no/such/folder"}, "images: '/no/such/folder' is not a folder"),
    ({"offline_eval": "retrieval"}, "offline_eval must be one of"),
    ({"limit": 0}, "limit must be an integer >= 1"),
    ({"target_image": "t.png"}, "target_image goes with objective feature_target"),
    ({"surrogates": ["dinov2"]}, "surrogates go with protocol transfer"),
    ({"surrogates": "dinov2"}, "surrogates must be a list"),
    ({"sigma": 0}, "sigma must be"),
    ({"n_samples": 0}, "n_samples must be"),
    ({"max_new_tokens": 0}, "max_new_tokens must be"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"attack": {"eps": 0.5}}, "attack must be an fs_mllm.attacks.AttackConfig"),
])
def test_attack_run_refuses_bad_settings_before_any_model_loads(fields, needle, tmp_path):
    from fs_mllm.evaluation.attack_pipeline import AttackRun

    with pytest.raises(ValueError, match=re.escape(needle)):
        AttackRun(out=tmp_path / "out", **fields)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; name a folder"):
        AttackRun(out=tmp_path / "file")


def test_attack_command_names_options_where_the_library_names_fields(saved_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _recipe().main(["--model", str(saved_model_dir), "--out", str(tmp_path / "out"), "--surrogates", "dinov2"])
    assert exc.value.code == 2 and "--surrogates go with --protocol transfer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_attack_from_python_writes_and_resumes_the_rows(tmp_path, saved_model_dir, monkeypatch):
    import fs_mllm.evaluation.attack_pipeline as pipeline
    from fs_mllm.attacks import AttackConfig
    from fs_mllm.evaluation.attack_pipeline import AttackRun, run_attack

    run = AttackRun(out=tmp_path / "out", model=str(saved_model_dir), offline_eval="vqa", limit=1, modes=("base",),
                    prompt_template="{image}{question}", max_new_tokens=3, device="cpu",
                    attack=AttackConfig(objective="untargeted", norm="l2", eps=0.5, steps=1))
    report = run_attack(run, progress=False)
    stored = [json.loads(line) for line in report.results_path.read_text().splitlines()]
    assert report.rows == stored and len(stored) == 1
    assert [s["mode"] for s in report.summary] == ["base"] and "| base" in report.table
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("a finished run loaded the model again"))
    assert run_attack(run, progress=False).rows == stored  # resumed: nothing recomputed, same rows
    assert len(report.results_path.read_text().splitlines()) == 1


def test_option_names_leave_the_values_a_user_gave_alone(capsys):
    """as_options spells fields as options, but never inside a quoted value (a path, a list the user typed)."""
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--out", "o", "--objective", "feature_target", "--target-image", "/tmp/limit/modes/x.png"])
    assert "--target-image: '/tmp/limit/modes/x.png' is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--out", "o", "--modes", "base,booster"])
    assert "--modes must be a comma-separated subset of ['base', 'fs', 'fs+gsb'], got 'base,booster'" in capsys.readouterr().err
