"""The verdict a data steward reads first: privacy, usefulness, fidelity and the release gate, one line each.

Each line has a status (``good`` / ``warn`` / ``bad`` / ``none``: the badge colour in ``report.html``), a word
to act on and one plain sentence with the numbers behind it. The lines are read from the audit's metrics (see
:func:`augflow.audit.run_audit`); they add no measurement. A release that passes the privacy gate but makes the
downstream classifier worse than duplicating the real images says so on the gate's line, in words.
"""

from __future__ import annotations

import math

from augflow.audit.downstream import best_verdict, usefulness_sentence

STATUSES = ("good", "warn", "bad", "none")
# Fidelity against the real-vs-real reference: synthetic class recognition, precision and coverage as fractions of
# the same numbers for real images. The worst of them decides: at least CLOSE is "close to real", at least FAR
# "below real", else "far from real". Rules of thumb for a first look, not thresholds from the literature.
CLOSE, FAR = 0.8, 0.5
OVERSAMPLING = "real+synthetic vs real+oversampled"


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}"


def _line(label: str, status: str, word: str, text: str) -> dict:
    assert status in STATUSES, status
    if text[:1].isascii():  # a sentence starts with a capital; "ε" stays Greek small epsilon
        text = text[:1].upper() + text[1:]
    return {"label": label, "status": status, "word": word, "text": text}


def privacy_line(m: dict) -> dict:
    """The ledger's guarantee, the membership-inference AUC and the copies, with the gate's privacy checks."""
    p, mem, gate = m["privacy"], m["memorization"], m["gate"]
    checks = gate["checks"]
    if p.get("differentially_private"):
        unit = (p.get("ledger") or {}).get("unit") or "image"
        word = f"differentially private (ε = {_num(p['epsilon'])})"
        parts = [f"ε = {_num(p['epsilon'])}, δ = {_num(p['delta'])} per {unit}, from the model's privacy ledger"]
        init = (p.get("ledger") or {}).get("init_from")
        if init:  # --init-from: the guarantee covers the fine-tuning data, not the pretraining data
            parts[0] += (", fine-tuned from a model pretrained on data declared public by the user"
                         if init.get("declared_public") else ", fine-tuned from a model not declared public")
        selection = ((m.get("inputs") or {}).get("synthetic") or {}).get("provenance", {}).get("selection") or {}
        if selection.get("declared_public"):
            parts[0] += ", samples selected by a classifier of data declared public"
    else:
        word = "not differentially private"
        parts = ["no formal guarantee (trained without differential privacy)"]
    copying = checks["copy_fraction"]["status"] == "fail" or checks["exact_copies"]["status"] == "fail"
    parts.append(("COPIES TRAINING IMAGES: " if copying else "no copying found: ")
                 + f"{mem['exact_copies']} exact and {mem['near_copies']} near copies, copy fraction "
                 f"{_num(mem['copy_fraction'])} (about 0.01 without copying; gate ≤ "
                 f"{_num(checks['copy_fraction']['threshold'])})")
    mia = m.get("membership_inference")
    if mia is None:
        parts.append("membership inference not evaluated (needs --model)")
    else:
        interval = mia.get("auc_interval")
        parts.append(f"membership-inference AUC {_num(mia['auc'])}"
                     + (f" (95% interval {_num(interval[0])}-{_num(interval[1])} over "
                        f"{mia['n_nonmember_subjects']} held-out subjects)" if interval else "")
                     + f" (0.5 = no leakage; gate ≤ {_num(checks['mia_auc']['threshold'])})")
    failed = {"copy_fraction", "exact_copies", "mia_auc"} & set(gate["failed"])
    status = "bad" if failed else "good" if p.get("differentially_private") else "warn"
    return _line("Privacy", status, word, "; ".join(parts) + ".")


def usefulness_line(m: dict) -> dict:
    """The synthetic top-up against the oversampling control, alone or beside duplicates (the better use decides):
    helped / hurt / not distinguishable."""
    ds = m.get("downstream")
    if ds is None:
        return _line("Usefulness", "none", "not evaluated",
                     "the downstream classifier was not trained (--no-downstream): whether the synthetic images "
                     "help a classifier is unknown.")
    c = ds.get("comparisons", {}).get(OVERSAMPLING)
    if c is None:
        return _line("Usefulness", "none", "not evaluated", usefulness_sentence(ds))
    best = best_verdict(ds)
    status = {"helped": "good", "hurt": "bad"}.get(best, "warn")
    arms = ds["protocols"]
    means = ", ".join(f"{name} {arms[name]['summary']['balanced_accuracy']['mean']:.3f}" for name in arms)
    seeds = " One seed has no interval: rerun with --seeds 3 or more to tell." if c["low"] is None else ""
    return _line("Usefulness", status, best,
                 f"{usefulness_sentence(ds)} Balanced accuracy on held-out real images: {means}.{seeds}")


def fidelity_line(m: dict) -> dict:
    """Class recognition, precision and coverage of the synthetic images beside the real-vs-real reference."""
    fo = m["fidelity"]["overall"]
    rec = m.get("recognition") or {}
    pairs = {"class recognition": (rec.get("synthetic_mean"), rec.get("real_mean")),
             "precision": (fo["synthetic"].get("precision"), fo["real"].get("precision")),
             "coverage": (fo["synthetic"].get("coverage"), fo["real"].get("coverage"))}
    parts, ratios = [], []
    for name, (syn, ref) in pairs.items():
        if syn is None or ref is None:
            continue
        if name == "class recognition":
            selected = rec.get("selected_by")
            parts.append(f"a real-trained classifier recognises {syn:.0%} of the synthetic images (real test images: "
                         f"{ref:.0%})" + (f", not counted: they were selected by `--select {selected}`"
                                          if selected else ""))
            if selected:
                continue
        else:
            parts.append(f"{name} {_num(syn, 2)} vs {_num(ref, 2)} real-vs-real")
        if ref > 0:
            ratios.append(syn / ref)
    if not ratios:
        return _line("Fidelity", "none", "not evaluated", "too few images for class recognition and PRDC.")
    worst = min(ratios)
    status, word = (("good", "close to real") if worst >= CLOSE else ("warn", "below real") if worst >= FAR
                    else ("bad", "far from real"))
    fid = f" (FID {_num(fo['synthetic'].get('fid'))} vs {_num(fo['real'].get('fid'))} real-vs-real)"
    return _line("Fidelity", status, word, "; ".join(parts) + fid + "." + detectability_sentence(m))


def detectability_sentence(m: dict) -> str:
    """How well a linear classifier tells the synthetic from the real images, beside real vs real (or "")."""
    det = (m.get("detectability") or {}).get("features") or {}
    if det.get("synthetic") is None or det.get("real") is None:
        return ""
    return (f" A linear classifier tells the synthetic from held-out real images with ROC AUC "
            f"{_num(det['synthetic'], 2)} in the audit's features (real training vs held-out real images: "
            f"{_num(det['real'], 2)}; 0.5 = indistinguishable).")


def gate_line(m: dict, usefulness: dict | None = None) -> dict:
    """The release gate (copying and membership inference only), and in words when the top-up hurt anyway."""
    gate = m["gate"]
    usefulness = usefulness or usefulness_line(m)
    if not gate["passed"]:
        return _line("Release gate", "bad", "failed",
                     "do not release: " + "; ".join(gate["checks"][name]["reason"] for name in gate["failed"]) + ".")
    if usefulness["word"] == "hurt":
        return _line("Release gate", "warn", "passed",
                     "privacy checks only, but the synthetic top-up made the classifier worse than duplicating the "
                     "real images: do not release it for augmentation.")
    tail = {"not distinguishable": " The top-up is not shown to help a classifier.",
            "not evaluated": " Usefulness was not evaluated."}.get(usefulness["word"], "")
    return _line("Release gate", "good", "passed",
                 "privacy checks only (copying, exact copies, membership inference); it does not judge usefulness "
                 "or fidelity." + tail)


def verdict(m: dict) -> dict[str, dict]:
    """The four verdict lines of an audit's metrics (needs ``m["gate"]``).

    Returns:
        ``{"privacy", "usefulness", "fidelity", "gate"}``, each ``{"label", "status" (one of ``STATUSES``),
        "word", "text"}``, in reading order.
    """
    usefulness = usefulness_line(m)
    return {"privacy": privacy_line(m), "usefulness": usefulness, "fidelity": fidelity_line(m),
            "gate": gate_line(m, usefulness)}
