"""Eval recipes (fs_mllm.evaluation.runner, recipes/eval_vqa.py, recipes/eval_caption.py).

What must hold: a killed run resumes without losing or double-counting a result, a truncated last line
is tolerated, a resume with other settings is refused, and a 2-process ``accelerate launch`` run gives
the same results as one process. Uses a tiny random-weight LLaVA (fs_mllm/testing.py) saved with a
word-level tokenizer and a CLIP image processor, so ``AutoProcessor``/``AutoModelForImageTextToText``
load it from a folder exactly as they would a real checkpoint, and a 4-question VQA set saved to disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


from fs_mllm.config import FSConfig  # noqa: E402
from fs_mllm.testing import IMAGE_TOKEN, VOCAB, build_llava  # noqa: E402

from fs_mllm.evaluation.runner import (  # noqa: E402
    EvalSettings,
    SettingsMismatchError,
    load_model,
    read_results,
    run_eval,
    shard_path,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = ("what is the a of in on color how many image picture photo this cat dog man woman red blue green "
         "yes no two one three there sky sea tree").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for w in WORDS:
        vocab[w] = len(vocab)
    i = len(vocab)
    while len(vocab) < VOCAB:
        vocab["<image>" if i == IMAGE_TOKEN else f"w{i}"] = i
        i += 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


class _quiet:
    """Silence warnings (processor backend notices) inside a block."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA + processor saved like a real checkpoint (loaded through the Auto classes)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    out = tmp_path_factory.mktemp("tiny_llava")
    model, _ = build_llava()
    with _quiet():
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(), patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    """Four VQA questions on random photos, saved with ``save_to_disk`` (loaded via load_eval_dataset)."""
    import datasets
    from PIL import Image

    from fs_mllm.evaluation.datasets import VQA_FEATURES

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    data = {
        "image": [images[0], images[0], images[1], images[2]],
        "question": ["what color is the cat", "how many dogs", "is there a man", "what is in the sky"],
        "answers": [["red"] * 10, ["two"] * 10, ["yes"] * 10, ["blue"] * 10],
        "question_id": [11, 12, 21, 31],
        "image_id": [1, 1, 2, 3],
    }
    out = tmp_path_factory.mktemp("vqa_set")
    datasets.Dataset.from_dict(data, features=VQA_FEATURES).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    with _quiet():
        return load_model(str(tiny_dir))


def _settings(tiny_dir, vqa_dir, **kw) -> EvalSettings:
    fs = FSConfig(sigma=kw.pop("sigma", 0.25), n_samples=kw.pop("n_samples", 2))
    base = dict(task="vqa", model=str(tiny_dir), dataset=str(vqa_dir), variants="base,fs", fs=fs,
                attack_eps=(0.5, 1.0), attack_steps=2, certify_n=4, max_new_tokens=3)
    base.update(kw)
    return EvalSettings(**base)


def _run(settings, out, loaded, **kw):
    model, processor = loaded
    with _quiet():
        return run_eval(settings, out, model=model, processor=processor, progress=False, **kw)


def _all_lines(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("results.rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _expected_keys(settings: EvalSettings, ids=("11", "12", "21", "31")) -> set:
    return {(i, v, b) for i in ids for v in settings.variants for b in settings.budgets}


class _Crash(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------

def test_settings_validation_names_the_parameter():
    with pytest.raises(ValueError, match="sigma"):
        EvalSettings(fs={"sigma": 0})
    with pytest.raises(ValueError, match="fs must be an fs_mllm.FSConfig"):
        EvalSettings(fs=0.25)
    assert EvalSettings(fs={"sigma": 0.5}).fs == FSConfig(sigma=0.5)
    # settings.json of fs_mllm 0.1 kept sigma/n_samples/seed flat; they resume as the same FSConfig
    flat = {k: v for k, v in EvalSettings(fs=FSConfig(sigma=0.5, seed=3)).to_dict().items() if k != "fs"}
    assert EvalSettings.from_dict({**flat, "sigma": 0.5, "seed": 3}).fs == FSConfig(sigma=0.5, seed=3)
    with pytest.raises(ValueError, match="variants"):
        EvalSettings(variants="base,smooth")
    with pytest.raises(ValueError, match="booster"):
        EvalSettings(model="some/other-model", variants="base,fs+gsb")
    from fs_mllm.models.mini_llava import BOOSTER_DIR

    assert EvalSettings(variants="base,fs+gsb").booster == str(BOOSTER_DIR)  # the embedded model's own booster
    with pytest.raises(ValueError, match="certify_n"):
        EvalSettings(certify_n=1)
    with pytest.raises(ValueError, match="attack_eps"):
        EvalSettings(attack_eps=(0.5, -1.0))
    with pytest.raises(ValueError, match="target"):
        EvalSettings(attack_eps=(0.5,), objective="targeted")
    assert EvalSettings(attack_eps=(1.0, 0.5)).budgets == (0.0, 0.5, 1.0)


def test_recipe_command_line_rejects_bad_values(tmp_path, capsys):
    from fs_mllm.commands.eval import main

    with pytest.raises(SystemExit):
        main("vqa", ["--output-dir", str(tmp_path / "o"), "--sigma", "-1"])
    assert "sigma" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main("caption", ["--output-dir", str(tmp_path / "o"), "--model", "some/other-model", "--variants", "base,fs+gsb"])
    assert "booster" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, tiny_dir, vqa_dir, loaded):
    settings = _settings(tiny_dir, vqa_dir)
    full = _run(settings, tmp_path / "full", loaded)
    assert full is not None and full["num_examples"] == 4
    # one row per (example, variant, budget) and every expected key present exactly once
    full_lines = _all_lines(tmp_path / "full")
    assert sorted(tuple(r["key"]) for r in full_lines) == sorted(_expected_keys(settings))

    crashed = tmp_path / "crashed"
    written = []

    def crash_after_7(row):
        written.append(row["key"])
        if len(written) == 7:
            raise _Crash("simulated kill after 7 results")

    with pytest.raises(_Crash):
        _run(settings, crashed, loaded, on_result=crash_after_7)
    assert len(_all_lines(crashed)) == 7
    assert not (crashed / "summary.json").exists()

    resumed = _run(settings, crashed, loaded, on_result=lambda row: written.append(row["key"]))
    lines = _all_lines(crashed)
    keys = [tuple(r["key"]) for r in lines]
    assert len(keys) == len(set(keys)), "a result was written twice"
    assert set(keys) == _expected_keys(settings), "a result was lost"
    assert len(written) == len(_expected_keys(settings)), "the resumed run recomputed finished results"
    assert resumed["table"] == full["table"]
    by_key = {tuple(r["key"]): r for r in full_lines}
    for r in lines:
        assert r == by_key[tuple(r["key"])]
    saved = json.loads((crashed / "summary.json").read_text())
    assert saved["table"] == full["table"]
    assert (crashed / "certified_curve.png").stat().st_size > 0
    assert (crashed / "accuracy_vs_budget.png").stat().st_size > 0
    assert "| variant |" in (crashed / "summary.md").read_text()


def test_truncated_last_line_is_tolerated(tmp_path, tiny_dir, vqa_dir, loaded):
    settings = _settings(tiny_dir, vqa_dir, attack_eps=(0.5,), certify_n=0)
    full = _run(settings, tmp_path / "full", loaded)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tmp_path / "full" / "settings.json", out / "settings.json")
    lines = (tmp_path / "full" / "results.rank0.jsonl").read_text().splitlines(keepends=True)
    # a crash after 5 complete rows, in the middle of writing the 6th
    (out / "results.rank0.jsonl").write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    assert len(read_results(out)) == 5  # the partial line is not a result
    resumed = _run(settings, out, loaded)
    text = (out / "results.rank0.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line parses: nothing glued to the fragment
    keys = [tuple(r["key"]) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == _expected_keys(settings)
    assert text.startswith("".join(lines[:5])), "existing results were rewritten"
    assert resumed["table"] == full["table"]

    # a bad line that is *not* the last one is corruption, not an interrupted write
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.rank0.jsonl").write_text(lines[0] + "{not json\n" + lines[1])
    with pytest.raises(ValueError, match="corrupt"):
        read_results(bad)


def test_settings_mismatch_is_refused(tmp_path, tiny_dir, vqa_dir, loaded):
    settings = _settings(tiny_dir, vqa_dir, attack_eps=(), certify_n=0, limit=2)
    _run(settings, tmp_path, loaded)
    before = shard_path(tmp_path, 0).read_bytes()
    with pytest.raises(SettingsMismatchError, match=r"sigma.*new output folder"):
        _run(_settings(tiny_dir, vqa_dir, attack_eps=(), certify_n=0, limit=2, sigma=0.5), tmp_path, loaded)
    with pytest.raises(SettingsMismatchError, match="variants"):
        _run(_settings(tiny_dir, vqa_dir, attack_eps=(), certify_n=0, limit=2, variants="base"), tmp_path, loaded)
    assert shard_path(tmp_path, 0).read_bytes() == before, "a refused resume touched the results"
    # results whose settings.json is gone cannot be checked: refused as well
    orphan = tmp_path.parent / (tmp_path.name + "_orphan")
    orphan.mkdir()
    shutil.copy(shard_path(tmp_path, 0), shard_path(orphan, 0))
    with pytest.raises(SettingsMismatchError, match="no settings.json"):
        _run(_settings(tiny_dir, vqa_dir, attack_eps=(), certify_n=0, limit=2), orphan, loaded)
    # a larger limit only adds examples: allowed, and the earlier rows stay as they were
    summary = _run(_settings(tiny_dir, vqa_dir, attack_eps=(), certify_n=0, limit=3), tmp_path, loaded)
    assert summary["num_examples"] == 3
    assert shard_path(tmp_path, 0).read_bytes().startswith(before)
    assert len(read_results(tmp_path)) == 3 * 2


def test_folder_without_rows_is_fresh(tmp_path, tiny_dir, vqa_dir, loaded):
    """Issue 14 item 12: a first run that failed before any row (a wrong model) does not pin the folder."""
    wrong = _settings(tiny_dir, vqa_dir, model=str(tmp_path / "no-such-model"), attack_eps=(), certify_n=0, limit=1)
    with pytest.raises(Exception), _quiet():
        run_eval(wrong, tmp_path / "out", progress=False)  # loads the model itself: fails
    assert not (tmp_path / "out").exists()  # the folder it created is gone: nothing to clean up or resume
    (tmp_path / "out").mkdir()  # a folder that existed before the failed run is kept, without rows
    with pytest.raises(Exception), _quiet():
        run_eval(wrong, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "settings.json").exists() and not read_results(tmp_path / "out")
    fixed = _settings(tiny_dir, vqa_dir, attack_eps=(), certify_n=0, limit=1)
    summary = _run(fixed, tmp_path / "out", loaded)
    assert summary["num_examples"] == 1
    stored = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert stored["model"] == str(tiny_dir)
    assert "crop_views" not in stored and "crop_full_view" not in stored  # at their old values: as older folders
    # once a row exists the settings are pinned again
    with pytest.raises(SettingsMismatchError, match="sigma"):
        _run(_settings(tiny_dir, vqa_dir, attack_eps=(), certify_n=0, limit=1, sigma=0.5), tmp_path / "out", loaded)


def test_second_writer_is_refused_while_the_first_holds_the_shard(tmp_path, tiny_dir, vqa_dir, loaded):
    """Issue 14 item 13: two runs on one folder at once would both write every key."""
    from fs_mllm.results import ResultsBusyError

    settings = _settings(tiny_dir, vqa_dir, attack_eps=(), certify_n=0, limit=2)
    refused = []

    def second_run_meanwhile(row):
        if not refused:
            with pytest.raises(ResultsBusyError, match=f"another run is writing to {tmp_path}"):
                _run(settings, tmp_path, loaded)
            refused.append(row["key"])

    summary = _run(settings, tmp_path, loaded, on_result=second_run_meanwhile)
    assert refused and summary["num_examples"] == 2
    keys = [tuple(r["key"]) for r in _all_lines(tmp_path)]
    assert len(keys) == len(set(keys)) == 2 * 2
    _run(settings, tmp_path, loaded)  # the lock is released when a run ends


def test_caption_run_with_booster(tmp_path, tiny_dir, loaded):
    import datasets
    from PIL import Image

    from fs_mllm.evaluation.datasets import CAPTION_FEATURES
    from fs_mllm.booster.model import GaussianSmoothnessBooster, GSBConfig

    torch.manual_seed(0)
    booster = GaussianSmoothnessBooster(GSBConfig(feature_dim=32, denoiser_channels=4, denoiser_depth=2,
                                                  denoiser_downscale=1, mapper_hidden=16, mapper_layers=1,
                                                  sigma_embed_dim=8))
    booster.save_pretrained(tmp_path / "booster")
    rng = np.random.default_rng(1)
    ds = datasets.Dataset.from_dict({
        "image": [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(3)],
        "captions": [["a red cat on the sea"], ["two dogs in the sky"], ["a man with a tree", "the man"]],
        "image_id": [5, 6, 7],
    }, features=CAPTION_FEATURES)
    settings = EvalSettings(task="caption", model=str(tiny_dir), dataset="in-memory", variants="base,fs,fs+gsb",
                            booster=str(tmp_path / "booster"), fs=FSConfig(n_samples=2), attack_eps=(0.5,), attack_steps=1,
                            objective="untargeted", max_new_tokens=3)
    summary = _run(settings, tmp_path / "out", loaded, dataset=ds)
    rows = summary["table"]["rows"]
    assert [(r["variant"], r["eps"]) for r in rows] == [(v, e) for v in ("base", "fs", "fs+gsb") for e in (0.0, 0.5)]
    for r in rows:
        assert r["CIDEr"] is not None and 0.0 <= r["ROUGE-L"] <= 1.0
    assert all(0.0 <= r["attack_success_rate"] <= 1.0 for r in rows if r["eps"] > 0)
    assert (tmp_path / "out" / "accuracy_vs_budget.png").exists()


def _launch_cmd(nproc: int, out: Path, tiny_dir: Path, vqa_dir: Path) -> list[str]:
    args = [str(REPO / "recipes" / "eval_vqa.py"), "--model", str(tiny_dir), "--dataset", str(vqa_dir),
            "--variants", "base,fs", "--n-samples", "2", "--attack-eps", "0.5", "--attack-steps", "2",
            "--certify-n", "4", "--max-new-tokens", "3", "--output-dir", str(out), "--no-progress"]
    if nproc == 1:
        return [sys.executable] + args
    # On a machine without GPUs `--multi_gpu` starts N gloo CPU processes (`--cpu` would start only one).
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(_free_port())] + args


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run a launch command the way the README shows it: one torch thread per worker, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _launch_two(out: Path, tiny_dir: Path, vqa_dir: Path, cwd: Path) -> None:
    proc = _launch(_launch_cmd(2, out, tiny_dir, vqa_dir), cwd)
    assert proc.returncode == 0, f"2-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_two_process_accelerate_launch_equals_one_process(tmp_path, tiny_dir, vqa_dir, loaded):
    pytest.importorskip("accelerate")
    out2 = tmp_path / "p2"
    _launch_two(out2, tiny_dir, vqa_dir, tmp_path)
    # the 1-process reference: same settings as the recipe's command line, in this process, one thread
    # like the launched workers (so float reductions run in the same order)
    settings = _settings(tiny_dir, vqa_dir, attack_eps=(0.5,), attack_steps=2, certify_n=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(settings, tmp_path / "p1", loaded)
    finally:
        torch.set_num_threads(threads)
    results = {1: tmp_path / "p1", 2: out2}
    shards = sorted(p.name for p in results[2].glob("results.rank*.jsonl"))
    assert shards == ["results.rank0.jsonl", "results.rank1.jsonl"], "the 2-process run did not shard"
    one, two = _all_lines(results[1]), _all_lines(results[2])
    keys_two = [tuple(r["key"]) for r in two]
    assert len(keys_two) == len(set(keys_two)) == len(one)
    by_key = {tuple(r["key"]): r for r in one}
    for r in two:
        ref = by_key[tuple(r["key"])]
        assert r["prediction"] == ref["prediction"], (r["key"], r["prediction"], ref["prediction"])
        for k in ("fcs", "s_low", "score"):
            if ref.get(k) is not None:
                assert r[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-6), (r["key"], k, r[k], ref[k])
    s1 = json.loads((results[1] / "summary.json").read_text())
    s2 = json.loads((results[2] / "summary.json").read_text())
    assert s1["num_examples"] == s2["num_examples"] == 4
    for a, b in zip(s1["table"]["rows"], s2["table"]["rows"]):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), k
            else:
                assert a[k] == b[k], k


@pytest.mark.slow
def test_two_process_resume_with_other_settings_is_refused_promptly(tmp_path, tiny_dir, vqa_dir):
    """Under ``accelerate launch`` the main process checks the folder's settings before the others pass
    the barrier: a mismatch must end the whole launch with the field named, not leave a rank waiting."""
    pytest.importorskip("accelerate")
    out = tmp_path / "p2"
    _launch_two(out, tiny_dir, vqa_dir, tmp_path)
    rows_before = _all_lines(out)
    command = _launch_cmd(2, out, tiny_dir, vqa_dir)
    command[command.index("--n-samples") + 1] = "3"
    second = _launch(command, tmp_path, timeout=180)
    assert second.returncode != 0
    assert "n_samples" in second.stdout + second.stderr
    assert _all_lines(out) == rows_before  # the refused run wrote nothing


def test_transfer_protocol_replays_one_crafted_image_on_every_variant(tmp_path, tiny_dir, vqa_dir, loaded, monkeypatch):
    """Issue 12: transfer images are crafted on the undefended model and replayed unchanged; rows carry
    the variant's answer for the target image and whether the attacked answer became it."""
    import fs_mllm.evaluation.runner as runner
    from fs_mllm.evaluation.runner import fs_attack

    crafted, configs = {}, []
    real_attack = runner.attack
    monkeypatch.setattr(runner, "attack", lambda *a, **k: configs.append(a[4]) or real_attack(*a, **k))

    def recording_attack(ctx, eps, settings, clean_answer, seed):
        adv = fs_attack(ctx, eps, settings, clean_answer, seed)
        from fs_mllm.patching import is_patched

        crafted[(ctx.prompt, float(ctx.pixels01.sum()), is_patched(ctx.model))] = adv.clone()
        return adv

    settings = _settings(tiny_dir, vqa_dir, protocol="transfer", objective="feature_target", attack_norm="linf",
                         attack_eps=(8 / 255,), attack_steps=2, certify_n=0, crop_scale=(0.5, 1.0), crop_views=2,
                         crop_full_view=True)
    summary = _run(settings, tmp_path / "out", loaded, attack_fn=recording_attack)
    by_example: dict = {}
    for (prompt, pixels, patched), adv in crafted.items():
        by_example.setdefault((prompt, pixels), {})[patched] = adv
    assert len(by_example) == 4 and all(len(v) == 2 for v in by_example.values())
    assert configs and all((c.crop_scale, c.crop_views, c.crop_full_view) == ((0.5, 1.0), 2, True) for c in configs)
    for pair in by_example.values():
        assert torch.equal(pair[False], pair[True])  # base and FS saw the very same adversarial image
    attacked = [r for r in _all_lines(tmp_path / "out") if r["budget"] > 0]
    assert attacked and all(r["protocol"] == "transfer" and "target_prediction" in r for r in attacked)
    assert all(r["target_hit"] in (True, False, None) for r in attacked)
    assert "transfer linf feature_target" in summary["markdown"] and "targeted_success" in summary["markdown"]


def test_protocol_settings_are_checked_before_any_work():
    with pytest.raises(ValueError, match="protocol"):
        EvalSettings(protocol="replay")
    with pytest.raises(ValueError, match="eps"):
        EvalSettings(attack_norm="linf", attack_eps=(16.0,))
    with pytest.raises(ValueError, match="crop_scale"):
        EvalSettings(attack_eps=(0.5,), crop_scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="crop_full_view"):
        EvalSettings(attack_eps=(0.5,), crop_full_view=True)  # no crop_scale
    with pytest.raises(ValueError, match="crop_views"):
        EvalSettings(attack_eps=(0.5,), protocol="transfer", crop_scale=(0.5, 1.0), crop_full_view=True)


def test_eval_command_line_carries_the_crop_views():
    from fs_mllm.commands.eval import build_parser, settings_from_args

    args = build_parser("vqa").parse_args(["--output-dir", "x", "--protocol", "transfer", "--objective", "feature_target",
                              "--attack-norm", "linf", "--attack-eps", "0.03", "--crop-scale", "0.5,1",
                              "--crop-views", "2", "--crop-full-view"])
    settings = settings_from_args(args, "vqa")
    assert (settings.crop_scale, settings.crop_views, settings.crop_full_view) == ((0.5, 1.0), 2, True)
    assert EvalSettings.from_dict(settings.to_dict()) == settings


def test_the_shared_settings_check_names_each_changed_field(tmp_path):
    """One settings.json check for every resumable folder (eval runner, defense checkpoint)."""
    from fs_mllm.results import SettingsMismatchError, check_settings, claim_settings

    settings = {"fs": {"sigma": 0.25, "n_samples": 8}, "limit": 2, "model": "m" * 200}
    claim_settings(tmp_path, settings, holds_results=False)
    check_settings(tmp_path, settings)
    check_settings(tmp_path, {**settings, "limit": 5}, may_change=("limit",))  # selects rows only: allowed
    with pytest.raises(SettingsMismatchError, match=r"fs\.sigma: stored 0\.25, now 0\.5\)") as refused:
        check_settings(tmp_path, {**settings, "fs": {"sigma": 0.5, "n_samples": 8}}, may_change=("limit",))
    assert "n_samples" not in str(refused.value) and "limit" not in str(refused.value)
    with pytest.raises(SettingsMismatchError, match=r"model: stored 'm{60}'\.\.\., now 'x'") as refused:
        check_settings(tmp_path, {**settings, "model": "x"})
    assert len(str(refused.value)) < 400  # a long value (a processor's JSON, a hash) is shortened
    # ...to the window where two long values differ, so the message shows the difference
    late = {**settings, "model": "m" * 150 + "X" + "m" * 49}
    with pytest.raises(SettingsMismatchError, match=r"stored \.\.\.'m{20}m{40}'\.\.\., now \.\.\.'m{20}X") as refused:
        check_settings(tmp_path, late)
    with pytest.raises(SettingsMismatchError, match=r"added: stored \(missing\), now 5"):
        check_settings(tmp_path, {**settings, "added": 5})
    check_settings(tmp_path, {**settings, "added": None})  # a field added since, at None (its old behaviour), matches

    # an old file is upgraded before comparing
    (tmp_path / "settings.json").write_text(json.dumps({"sigma": 0.25, "n_samples": 8, "limit": 2, "model": "m" * 200}))
    check_settings(tmp_path, settings, upgrade=lambda old: {"fs": {k: old.pop(k) for k in ("sigma", "n_samples")}, **old})
    # a folder that holds results keeps its settings; one that holds none is claimed again
    claim_settings(tmp_path, {"other": 1}, holds_results=True)
    check_settings(tmp_path, settings, upgrade=lambda old: {"fs": {k: old.pop(k) for k in ("sigma", "n_samples")}, **old})
    claim_settings(tmp_path, {"other": 1}, holds_results=False)
    check_settings(tmp_path, {"other": 1})
    (tmp_path / "settings.json").unlink()
    with pytest.raises(SettingsMismatchError, match="holds results but no settings.json"):
        check_settings(tmp_path, {"other": 1})


def test_an_eval_folder_of_fs_mllm_0_1_resumes_through_the_upgrade(tmp_path):
    """0.1 stored sigma/n_samples/seed at the top level: the same settings still match, other ones do not."""
    from fs_mllm.attacks import without_added_defaults
    from fs_mllm.results import SettingsMismatchError, shard_path
    from fs_mllm.evaluation.settings import verify_settings

    # the crop fields came later: a folder without them ran what crop_views=1 / crop_full_view=False run,
    # and the runner's stored identity leaves them out at those values
    current = without_added_defaults({"model": "m", "fs": FSConfig(sigma=0.25, n_samples=8, seed=3).to_dict(),
                                      "limit": 2, "crop_views": 1, "crop_full_view": False})
    old = {"model": "m", "sigma": 0.25, "n_samples": 8, "seed": 3, "limit": 1}
    (tmp_path / "settings.json").write_text(json.dumps(old))
    shard_path(tmp_path, 0).write_text(json.dumps({"key": ["q0", "base", 0.0]}) + "\n")
    verify_settings(tmp_path, current)  # limit only chooses rows
    for field, value in (("crop_views", 2), ("crop_full_view", True)):
        with pytest.raises(SettingsMismatchError, match=field):
            verify_settings(tmp_path, without_added_defaults({**current, field: value}))
    other = {**current, "fs": FSConfig(sigma=0.5, n_samples=8, seed=3).to_dict()}
    with pytest.raises(SettingsMismatchError, match=r"fs\.sigma: stored 0\.25, now 0\.5"):
        verify_settings(tmp_path, other)


def test_an_eval_folder_with_certify_alpha_resumes_as_fs_alpha(tmp_path):
    """EvalSettings used to have certify_alpha beside fs.alpha (which certified nothing there); a stored
    certify_alpha is now the FSConfig's alpha: the same certificates match, another alpha is named, and an
    odd stored file is refused naming the field, never a crash."""
    from fs_mllm.results import SettingsMismatchError, shard_path
    from fs_mllm.evaluation.settings import verify_settings

    stored = {"model": "m", "certify_n": 50, "certify_alpha": 0.01, "fs": FSConfig().to_dict()}
    (tmp_path / "settings.json").write_text(json.dumps(stored))
    shard_path(tmp_path, 0).write_text(json.dumps({"key": ["q0", "fs", 0.0]}) + "\n")
    current = {"model": "m", "certify_n": 50, "fs": FSConfig(alpha=0.01).to_dict()}
    verify_settings(tmp_path, current)
    with pytest.raises(SettingsMismatchError, match=r"fs\.alpha: stored 0\.01, now 0\.001"):
        verify_settings(tmp_path, {**current, "fs": FSConfig().to_dict()})
    assert EvalSettings.from_dict({k: v for k, v in stored.items() if k != "model"}).fs.alpha == 0.01
    assert "certify_alpha" not in EvalSettings().to_dict()
    for odd, field in (({"fs": "junk"}, "fs"), ({"fs": {**FSConfig().to_dict(), "bogus": 1}}, "bogus"),
                       ({"certify_alpha": "0.001"}, "alpha"), ({"certify_alpha": None}, "alpha")):
        (tmp_path / "settings.json").write_text(json.dumps({**stored, **odd}))
        with pytest.raises(SettingsMismatchError, match=field):
            verify_settings(tmp_path, current)


def test_answer_length_defaults_are_the_commands_for_each_task():
    """EvalSettings built in Python answers as long as the command line does (vqa 10, caption 24 tokens),
    and stores the number, so a settings.json written before the default moved here still matches."""
    from fs_mllm.commands.eval import build_parser, settings_from_args

    for task, tokens in (("vqa", 10), ("caption", 24)):
        settings = EvalSettings(task=task)
        assert settings.max_new_tokens == tokens == build_parser(task).get_default("max_new_tokens")
        assert settings_from_args(build_parser(task).parse_args(["--output-dir", "x"]), task) == settings
        assert settings.to_dict()["max_new_tokens"] == tokens and EvalSettings.from_dict(settings.to_dict()) == settings


def test_a_results_folder_claims_resumes_and_refuses_by_one_rule(tmp_path):
    """fs_mllm.results.ResultsFolder, the store of the defense checkpoints and certified answers: an empty folder
    is claimed (its settings.json written over), a folder with rows resumes only under its settings (may_change
    aside) and reads its rows back by key, one run at a time, a corrupt file is named, a torn tail is cut."""
    from fs_mllm.results import ResultsBusyError, ResultsFolder, ResultsFolderError, SettingsMismatchError

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps({"sigma": 9}))  # a first run that stopped before any row
    with ResultsFolder(folder, {"sigma": 0.25, "limit": 1}, may_change=("limit",)) as results:
        assert results.done == {}
        row = results.put(("q0", "fs"), {"radius": float("nan"), "span": (1, 2)})
        assert row == {"key": ["q0", "fs"], "radius": None, "span": [1, 2]}  # as a resume reads it back
        with pytest.raises(ResultsBusyError):
            ResultsFolder(folder, {"sigma": 0.25, "limit": 1}, may_change=("limit",))
    assert json.loads((folder / "settings.json").read_text()) == {"sigma": 0.25, "limit": 1}
    with (folder / "rows.jsonl").open("a") as handle:
        handle.write('{"key": ["q1", "fs"], "rad')  # killed mid-write
    with ResultsFolder(folder, {"sigma": 0.25, "limit": 2}, may_change=("limit",)) as results:
        assert results.done == {("q0", "fs"): row}
        with pytest.raises(ValueError, match="not the key it is stored under"):
            results.put(("q1", "fs"), {"key": ["q2", "fs"]})
    with (folder / "rows.jsonl").open("a") as handle:
        handle.write('{"key": ["q1", "fs"], "radius": 0.5}')  # whole, but its newline never written: cut, not counted
    with ResultsFolder(folder, {"sigma": 0.25, "limit": 2}, may_change=("limit",)) as results:
        assert list(results.done) == [("q0", "fs")]
    assert (folder / "rows.jsonl").read_text().count("\n") == 1 and "radius\": 0.5" not in (folder / "rows.jsonl").read_text()
    with pytest.raises(SettingsMismatchError, match=r"sigma: stored 0\.25, now 0\.5"):
        ResultsFolder(folder, {"sigma": 0.5, "limit": 1}, may_change=("limit",))
    ResultsFolder(folder, {"sigma": 0.25, "limit": 1}).close()  # the refusal above released the folder
    (folder / "rows.jsonl").write_text("not json\n" + (folder / "rows.jsonl").read_text())
    with pytest.raises(ResultsFolderError, match="line 1 is not a valid result row"):
        ResultsFolder(folder, {"sigma": 0.25, "limit": 1})


def test_a_results_folder_of_shards_reads_every_shard_and_claims_once(tmp_path):
    """Several processes share a folder as shards: each writes its own file, reads all (rank order, first row of a
    key wins), and only the claiming one writes settings.json, the others check it after the barrier."""
    from fs_mllm.results import ResultsFolder, SettingsMismatchError, result_key, shard_path

    calls = []
    shard = lambda rank, settings, claims: ResultsFolder(  # noqa: E731
        tmp_path, settings, rows_file=shard_path(tmp_path, rank).name, shards=True, claims=claims,
        synchronize=lambda: calls.append(rank), key=result_key)
    with shard(1, {"sigma": 0.25}, claims=True) as one:
        one.put(result_key("q1", "fs", 0), {"prediction": "b"})
    shard_path(tmp_path, 0).write_text(json.dumps({"key": ["q1", "fs", 0.0], "prediction": "a"}) + "\n")
    with shard(2, {"sigma": 0.25}, claims=False) as two:
        assert two.done[("q1", "fs", 0.0)]["prediction"] == "a" and calls == [1, 2]  # rank 0 first
    with pytest.raises(SettingsMismatchError, match="sigma"):
        shard(3, {"sigma": 0.5}, claims=False)  # a non-claiming process never writes settings.json
    assert json.loads((tmp_path / "settings.json").read_text()) == {"sigma": 0.25}
