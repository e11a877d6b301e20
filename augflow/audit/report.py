"""The audit's outputs: the release gate, and ``metrics.json`` / ``report.md`` / ``report.html``.

The report opens with the verdict (:mod:`augflow.audit.verdict`: privacy, usefulness, fidelity, release gate, one
coloured line each), then a *data card* for the synthetic file (after "Datasheets for Datasets", Gebru et al.
2018, arXiv 1803.09010, and "Model Cards", Mitchell et al. 2019, arXiv 1810.03993): what the data is, how it
was made, its privacy status in plain words, the audit summary, and intended and unsuitable uses. Each topic
follows with its figure before the table of its numbers; the recipe and the settings come last, as key-value
tables with the raw JSON folded in a closed ``<details>``. The report is meant to travel with the release, so it
names files by base name and SHA-256 and every text passes :func:`scrub_paths`; ``metrics.json`` keeps the full
paths. The HTML file is self-contained (the figures of :mod:`augflow.audit.figures` embedded as base64 PNG); the
Markdown file links the same PNGs in ``figures/``. Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from augflow.atomic import atomic_path, atomic_write_text
from augflow.audit.downstream import CONFIDENCE, usefulness_sentence
from augflow.audit.verdict import CLOSE, FAR, verdict
from augflow.errors import ConfigError
from augflow.train.privacy.ledger import Ledger

REPORT_FILES = ("metrics.json", "report.md", "report.html")  # what write_report writes, beside figures/
NOT_DP = ("not differentially private: the generator was trained without differential privacy, so nothing "
          "formally limits what the synthetic images reveal about individual training subjects")


@dataclass(frozen=True)
class GateThresholds:
    """Release-gate thresholds (all must hold for a release).

    Attributes:
        max_copy_fraction: Largest allowed fraction of synthetic images closer to a training image than the
            closest 1% of held-out real images. A generator that does not copy scores about 0.01 by
            construction (with sampling noise, in each of the two spaces), so the default 0.05 flags copying
            at five times the chance rate.
        max_mia_auc: Largest allowed ROC AUC of the likelihood membership-inference attack (0.5 = no leakage);
            only evaluated when the model is given.
        max_exact_copies: Largest allowed number of synthetic images equal to a training image (to half an
            8-bit grey level).
    """

    max_copy_fraction: float = 0.05
    max_mia_auc: float = 0.6
    max_exact_copies: int = 0

    def __post_init__(self):
        if not 0 <= self.max_copy_fraction <= 1:
            raise ConfigError(f"--max-copy-fraction must be in range [0, 1], but is: {self.max_copy_fraction}")
        if not 0.5 <= self.max_mia_auc <= 1:
            raise ConfigError(f"--max-mia-auc must be in range [0.5, 1], but is: {self.max_mia_auc}")
        if self.max_exact_copies < 0:
            raise ConfigError(f"--max-exact-copies must be non-negative, but is: {self.max_exact_copies}")


def release_gate(metrics: dict, thresholds: GateThresholds | None = None) -> dict:
    """Check the audit's metrics against the thresholds.

    Arguments:
        metrics: Needs ``metrics["memorization"]`` (``copy_fraction``, ``exact_copies``) and, when a model was
            audited, ``metrics["membership_inference"]["auc"]`` (None: not evaluated).
        thresholds: Default :class:`GateThresholds` when None.

    Returns:
        ``{"passed", "checks": {name: {"value", "threshold", "status" ("pass" | "fail" | "not evaluated"),
        "reason"}}, "failed": [names], "reasons": [...], "thresholds": {...}}``. A check that cannot be
        evaluated (no model for membership inference) does not fail the gate but is listed as such.
    """
    t = thresholds or GateThresholds()
    mem = metrics["memorization"]
    mia = metrics.get("membership_inference")
    values = {
        "copy_fraction": (mem["copy_fraction"], t.max_copy_fraction, "fraction of synthetic images closer to a "
                          "training image than the closest 1% of held-out images"),
        "exact_copies": (mem["exact_copies"], t.max_exact_copies, "synthetic images identical to a training image"),
        "mia_auc": (None if mia is None else mia["auc"], t.max_mia_auc, "membership-inference ROC AUC"
                    + ("" if mia is None or not mia.get("auc_interval") else
                       f"; 95% interval {_fmt(mia['auc_interval'][0])}-{_fmt(mia['auc_interval'][1])} over "
                       f"{mia['n_nonmember_subjects']} held-out subjects")),
    }
    checks, failed, reasons = {}, [], []
    for name, (value, limit, what) in values.items():
        if value is None:
            status, reason = "not evaluated", f"{name}: not evaluated (needs --model)"
        elif value <= limit:
            status, reason = "pass", f"{name} = {_fmt(value)} <= {_fmt(limit)} ({what})"
        else:
            status, reason = "fail", f"{name} = {_fmt(value)} > {_fmt(limit)} ({what})"
            failed.append(name)
        checks[name] = {"value": value, "threshold": limit, "status": status, "reason": reason}
        reasons.append(reason)
    return {"passed": not failed, "checks": checks, "failed": failed, "reasons": reasons, "thresholds": asdict(t)}


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool | str):
        return str(v)
    if isinstance(v, int | np.integer):
        return str(int(v))
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _ci(ci) -> str:
    return "" if not ci else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _pm(stat: dict, seeds: int) -> str:
    if stat["mean"] is None or math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.3f}" if seeds == 1 else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


_ABS_PATH = re.compile(r"(?<![\w.:/\\-])(?:~|[A-Za-z]:)?[/\\][^\s\"'<>|,;()\[\]]*")


def base_name(path) -> str:
    """The last component of a POSIX or Windows path (the path itself if it has none, e.g. "/")."""
    return re.split(r"[/\\]", str(path).rstrip("/\\"))[-1] or str(path)


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path (``/...``, ``~/...``, ``C:\\...``) replaced by its base name.

    The report is shared with the release; the data holder's directory layout is not. URLs and relative
    fractions such as ``bits/dim`` are left alone.
    """
    return _ABS_PATH.sub(lambda match: base_name(match.group()), text)


def public_command(command: str) -> str:
    """The command line with each path argument (a token, or an ``--option=`` value, with a slash) as its base name."""
    out = []
    for token in command.split(" "):
        option, eq, value = token.partition("=") if token.startswith("-") else ("", "", token)
        out.append(option + eq + (base_name(value) if re.search(r"[/\\]", value) else value))
    return scrub_paths(" ".join(out))


def public_paths(obj):
    """A copy of a JSON-like object for the report: absolute paths in strings as base names, and so is every
    value whose key has a ``<key>_sha256`` sibling (a file named next to its hash, as in ledgers and provenance)."""
    if isinstance(obj, dict):
        return {k: base_name(v) if isinstance(v, str) and f"{k}_sha256" in obj else public_paths(v)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [public_paths(v) for v in obj]
    return scrub_paths(obj) if isinstance(obj, str) else obj


def _value(v) -> str:
    if isinstance(v, str):
        return v or '""'
    if isinstance(v, list) and v and all(isinstance(i, str) for i in v):
        return "; ".join(v)
    return json.dumps(v)


def key_values(obj: dict, prefix: str = "") -> list[list[str]]:
    """Rows ``[dotted key, value]`` of a nested dict, for a readable table of a recipe or a ledger."""
    rows = []
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            rows += key_values(v, f"{prefix}{k}.")
        else:
            rows.append([f"{prefix}{k}", _value(v)])
    return rows


class _Doc:
    """Blocks rendered to both Markdown and self-contained HTML. Every text passes :func:`scrub_paths`."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, scrub_paths(text)))

    def p(self, text: str):
        self.blocks.append(("p", scrub_paths(text)))

    def items(self, items: list[str]):
        self.blocks.append(("ul", [scrub_paths(i) for i in items]))

    def table(self, header: list[str], rows: list[list]):
        self.blocks.append(("table", header, [[scrub_paths(_fmt(v) if not isinstance(v, str) else v) for v in r]
                                              for r in rows]))

    def figure(self, name: str, png: bytes, caption: str):
        self.blocks.append(("figure", name, png, scrub_paths(caption)))

    def code(self, text: str):
        self.blocks.append(("code", scrub_paths(text)))

    def details(self, summary: str, text: str):
        """Raw text (JSON) folded away: a closed ``<details>`` element in both formats."""
        self.blocks.append(("details", scrub_paths(summary), scrub_paths(text)))

    def verdict(self, lines: list[dict]):
        """The verdict block: per line a label, a status (badge colour), a word and a sentence."""
        self.blocks.append(("verdict", [{k: scrub_paths(v) for k, v in line.items()} for line in lines]))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "table":
                lines = ["| " + " | ".join(b[1]) + " |", "|" + " --- |" * len(b[1])]
                lines += ["| " + " | ".join(r) + " |" for r in b[2]]
                out.append("\n".join(lines))
            elif b[0] == "figure":
                out.append(f"![{b[3]}](figures/{b[1]}.png)\n\n*{b[3]}*")
            elif b[0] == "code":
                out.append(f"```\n{b[1]}\n```")
            elif b[0] == "details":
                out.append(f"<details><summary>{html.escape(b[1])}</summary>\n\n```json\n{b[2]}\n```\n\n</details>")
            elif b[0] == "verdict":
                out.append("\n".join(f"- **{v['label']}: {v['word']}** — {v['text']}" for v in b[1]))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(c)}</th>" for c in b[1])
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b[0] == "figure":
                data = base64.b64encode(b[2]).decode()
                out.append(f'<figure><img alt="{e(b[3])}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{e(b[3])}</figcaption></figure>")
            elif b[0] == "code":
                out.append(f"<pre>{e(b[1])}</pre>")
            elif b[0] == "details":
                out.append(f"<details><summary>{e(b[1])}</summary><pre>{e(b[2])}</pre></details>")
            elif b[0] == "verdict":
                out.append('<div class="verdict" id="verdict">' + "".join(
                    f'<p><b>{e(v["label"])}</b> <span class="badge {e(v["status"])}">{e(v["word"])}</span> '
                    f"— {e(v['text'])}</p>" for v in b[1]) + "</div>")
        style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
                 "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;"
                 "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#eee}"
                 "img{max-width:100%}pre{background:#f6f6f6;padding:0.5em;overflow-x:auto}"
                 "figcaption{font-style:italic;font-size:90%}"
                 ".verdict{border:1px solid #bbb;border-radius:6px;padding:0.2em 1em;margin:1em 0}"
                 ".verdict p{margin:0.5em 0}.badge{display:inline-block;padding:0 0.5em;border-radius:4px;"
                 "color:#fff;font-weight:bold}.good{background:#2e7d32}.warn{background:#a15c00}"
                 ".bad{background:#c62828}.none{background:#6b6b6b}summary{cursor:pointer;color:#444}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def _privacy_text(privacy: dict) -> str:
    """The model's privacy in words, from its ledger (the metrics' ``privacy["ledger"]``); a model that started from
    another one (``--init-from``) first says so: "pretrained on public data X; fine-tuned with (epsilon, delta)-DP"."""
    ledger = Ledger.from_dict(privacy["ledger"])
    origin = "" if ledger is None or not ledger.pretraining() else f"The generator was {ledger.pretraining()}. "
    if ledger is None or not ledger.differentially_private:
        return "Privacy: " + origin + (NOT_DP[0].upper() + NOT_DP[1:] if origin else NOT_DP) + "."
    # The ledger's unit of privacy: a slice, or a subject (all of one patient's slices) with --dp-unit subject.
    who = "any single training subject (all of a patient's slices)" if ledger.unit == "subject" else \
        "any single training image (slice; a patient with k slices is protected only at about k * epsilon)"
    effect = f"{who} changes the probability of any synthetic output by at most a factor e^epsilon (plus delta)."
    if origin:
        return (f"Privacy: {origin}Per the model's privacy ledger (epsilon = {_fmt(ledger.epsilon)}, delta = "
                f"{_fmt(ledger.delta)}), {effect} The guarantee covers the private fine-tuning data only; the "
                "pretraining data are not protected by it.")
    return (f"Privacy: trained with differential privacy, (epsilon = {_fmt(ledger.epsilon)}, delta = "
            f"{_fmt(ledger.delta)}) per the model's privacy ledger: {effect}")


def _file(path, sha256: str | None) -> str:
    """A file as the report names it: its base name and the start of its SHA-256."""
    return base_name(path) + ("" if not sha256 else f" (SHA-256 {sha256[:16]}...)")


def build_document(m: dict, figures: dict[str, bytes]) -> _Doc:
    """The report of an audit's metrics (see :func:`augflow.audit.run_audit`) with its figures.

    Order: the verdict (privacy, usefulness, fidelity, release gate), the data card, then per topic the figure
    before the table of its exact numbers, and last the settings (key-value tables, the raw JSON folded) and the
    inputs. Files are named by base name and SHA-256; no absolute path of the data holder's machine is written.
    """
    doc = _Doc()
    names = m["inputs"]["class_names"]
    syn = m["inputs"]["synthetic"]
    gate = m["gate"]
    ds = m.get("downstream")
    doc.h(1, f"Audit of {base_name(syn['path'])}")
    doc.verdict(list((m.get("verdict") or verdict(m)).values()))
    doc.p(f"Privacy and the release gate judge copying and leakage only; usefulness compares a classifier trained "
          "on the real images plus the synthetic top-up (alone, and beside duplicates of the real images) with one "
          "trained on the real images with the minority classes duplicated to the same count; fidelity is close to "
          f"real when class recognition, precision and coverage all reach {CLOSE:.0%} of the real-vs-real value "
          f"(far below {FAR:.0%}). Details below.")

    doc.h(2, "Data card")
    doc.h(3, "What the data is")
    shape = "x".join(map(str, syn["image_shape"]))
    near = (syn.get("provenance") or {}).get("near")
    origin = ("they show no real subject, but resemble the training data by design." if not near else
              f"each was derived from a real image of {near['real']} (its latent mixed with noise of strength "
              f"{near['strength']}), so they vary around real subjects: for in-house training, not for sharing.")
    doc.p(f"{syn['n']} synthetic 2D image slices of shape {shape} (C x H x W, intensities in [0, 1]) in augflow's "
          f"HDF5 format, labelled with {len(names)} classes. They were sampled from a class-conditional generative "
          f"model trained on the real training file below; {origin}")
    doc.table(["class", "synthetic", "real train", "real test"],
              [[n, syn["class_counts"][n], m["inputs"]["train"]["class_counts"][n],
                m["inputs"]["real"]["class_counts"][n]] for n in names])
    doc.h(3, "How it was made")
    prov = syn.get("provenance") or {}
    model = m["inputs"].get("model")
    recipe = prov.get("recipe")
    doc.table(["item", "value"], [
        ["generator", str(prov.get("generator", "unknown"))],
        ["model file", _file(prov["model"], prov.get("model_sha256")) if prov.get("model") else
         _file(model["path"], model["sha256"]) if model else "unknown"],
        ["recipe", "unknown" if recipe is None else f"{recipe.get('name', 'unnamed')} (every setting under Settings)"],
        ["temperature", prov.get("temperature", "unknown")],
        *([["classifier-free guidance", prov["guidance"]]] if prov.get("guidance", 1) != 1 else []),
        ["seed", prov.get("seed", "unknown")],
        ["augflow version", str(prov.get("augflow_version", syn.get("augflow_version", "unknown")))],
        ["created", str(syn.get("created_at", "unknown"))],
        ["training file", _file(m["inputs"]["train"]["path"], m["inputs"]["train"]["sha256"])],
    ])
    if prov:
        doc.details("Raw provenance of the synthetic file (JSON)", json.dumps(
            public_paths({k: v for k, v in prov.items() if k not in ("recipe", "privacy")}), indent=1,
            sort_keys=True, default=str))
    doc.h(3, "Privacy")
    privacy = m["privacy"]
    doc.p(_privacy_text(privacy))
    selection = prov.get("selection") or {}
    if selection.get("declared_public"):
        doc.p(f"The images were kept by `augflow synthesize --select {selection['method']}` with a classifier trained "
              f"on {_file(selection.get('trained_on', 'a file'), selection.get('trained_on_sha256'))}, which the user "
              "declared public: a selection with public data costs no privacy, and the guarantee above covers the "
              "release as selected.")
    if privacy.get("ledger"):
        ledger = public_paths(privacy["ledger"])
        doc.table(["privacy ledger", "value"], key_values(ledger))
        doc.details("Raw privacy ledger (JSON)", json.dumps(ledger, indent=1, sort_keys=True, default=str))
    mia = m.get("membership_inference")
    if mia is not None:
        doc.p(f"Empirical check: a likelihood membership-inference attack reaches ROC AUC {mia['auc']:.3f}; the "
              f"implied lower bound on epsilon is {mia['epsilon_lower_bound']:.3f} (95% confidence, delta "
              f"{_fmt(mia['delta'])}). A lower bound from one attack: a small value is no proof of privacy.")
    doc.h(3, "Audit summary")
    summary = [f"Copying: copy_fraction {_fmt(m['memorization']['copy_fraction'])} (about 0.01 expected without "
               f"copying), {m['memorization']['exact_copies']} exact and {m['memorization']['near_copies']} near "
               "copies of training images."]
    fo = m["fidelity"]["overall"]
    rec = m.get("recognition")
    if rec is not None and rec["synthetic_mean"] is not None:
        summary.append(f"Class recognition: a classifier trained on the real images files {rec['synthetic_mean']:.0%}"
                       f" of the synthetic images under their own class (real test images: {rec['real_mean']:.0%}).")
    summary.append(f"Fidelity ({m['feature_space']['name']} features): FID {_fmt(fo['synthetic']['fid'])} for "
                   f"synthetic vs {_fmt(fo['real']['fid'])} for real training images (lower is better; the real "
                   "value is the reachable floor at this sample size).")
    div = m["diversity"]
    summary.append(f"Diversity: intra-class {div['settings']['method'].upper()} {_fmt(div['synthetic']['intra'])} "
                   f"synthetic vs {_fmt(div['real']['intra'])} real (higher means less diverse).")
    if ds is not None:
        parts = [f"{p} {_pm(v['summary']['balanced_accuracy'], ds['seeds'])}" for p, v in ds["protocols"].items()]
        summary.append("Downstream CNN balanced accuracy on held-out real images: " + "; ".join(parts) + ". "
                       + usefulness_sentence(ds))
    doc.items(summary)
    doc.h(3, "Intended uses")
    doc.items([
        "Augmenting the training data of image classifiers for these classes, on data acquired and preprocessed "
        "like the real training data, with evaluation on real held-out images.",
        "Method development, benchmarking of augmentation and privacy techniques, teaching.",
    ])
    doc.h(3, "Unsuitable uses")
    doc.items([
        "Clinical diagnosis, or any decision about a patient.",
        "Evaluating or validating models (test on real held-out data, never on synthetic images).",
        "Inferring anatomy, pathology or prevalence: the images follow the model, not the population.",
        "Other classes, scanners, modalities or preprocessing than those of the training data.",
        "Release outside the data owner's governance when the release gate failed or the data is not "
        "differentially private and the training data may not be shared.",
    ])

    doc.h(2, "Release gate")
    doc.table(["check", "value", "threshold", "status"],
              [[k, c["value"], c["threshold"], c["status"]] for k, c in gate["checks"].items()])
    doc.p("Defaults: copy_fraction <= 0.05, exact copies 0, membership-inference AUC <= 0.6 "
          "(change with --max-copy-fraction, --max-exact-copies, --max-mia-auc).")

    if ds is not None:
        doc.h(2, "Downstream classification")
        r = ds["recipe"]
        seeds = ds["seeds"]
        several = isinstance(r["epochs"], list)
        if several:
            budget = (f"each protocol trained for {' and '.join(map(str, r['epochs']))} epochs"
                      + (" of the real training images' steps" if r.get("steps") is not None else "")
                      + f" and reported at the budget with its best mean balanced accuracy on the {ds['val_n']} "
                      "validation images of --val")
        else:
            budget = (f"{r['epochs']} epochs" if r.get("steps") is None else
                      f"{r['steps']} steps each, the steps of {r['epochs']} epochs over the real training images")
        doc.p(f"ResNet-18 from scratch ({budget}, batch {r['batch_size']}, lr {r['lr']}, class-weighted loss), "
              + ("one seed" if seeds == 1 else f"mean ± std over {seeds} seeds")
              + f", tested on {ds['test_n']} held-out real images. Minority classes (marked *): "
              + (", ".join(ds["minority_classes"]) or "none") + ". "
              + (f"No held-out image of {', '.join(ds['classes_without_test_images'])}: its recall is not measured "
                 "(n/a) and balanced accuracy averages the other classes. "
                 if ds.get("classes_without_test_images") else "")
              + usefulness_sentence(ds))
        if "recall" in figures:
            doc.figure("recall", figures["recall"], "Per-class recall on the held-out real images by training set "
                       "(minority classes starred and shaded)")
        protocols = list(ds["protocols"])
        rows = [[key] + [_pm(ds["protocols"][p]["summary"][key], seeds) for p in protocols]
                for key in ("accuracy", "balanced_accuracy", "auc_macro", "precision_macro", "recall_macro",
                            "f1_macro")]
        rows += [[f"recall {n}{' *' if n in ds['minority_classes'] else ''}"]
                 + [_pm(ds["protocols"][p]["summary"]["per_class_recall"][n], seeds) for p in protocols]
                 for n in names]
        rows.append(["training images"] + [str(ds["protocols"][p]["n_train"]) for p in protocols])
        if several:
            rows.append(["epochs (chosen on --val)"] + [str(ds["protocols"][p]["epochs"]) for p in protocols])
        if ds.get("val_n"):
            rows += [[f"val balanced accuracy, {e} epochs"]
                     + [_fmt(ds["protocols"][p]["val_balanced_accuracy"][str(e)]) for p in protocols]
                     for e in (r["epochs"] if several else [r["epochs"]])]
        doc.table(["metric", *protocols], rows)
        if ds.get("comparisons"):
            doc.table(["paired difference (balanced accuracy)", "mean", f"{CONFIDENCE:.0%} interval", "verdict"],
                      [[name, f"{c['mean']:+.3f}", "n/a (one seed)" if c["low"] is None else
                        f"{c['low']:+.3f} to {c['high']:+.3f}", c["verdict"]]
                       for name, c in ds["comparisons"].items()])
        for name, why in (ds.get("skipped") or {}).items():
            doc.p(f"Not run: `{name}` {why}.")
    lk = m.get("likelihood_classifier")
    if lk is not None:
        doc.p(f"The model's own likelihood classifier on the same test images, calibration {lk['calibration']}: "
              f"accuracy {lk['accuracy']:.3f}, "
              f"balanced accuracy {lk['balanced_accuracy']:.3f}, macro AUC {_fmt(lk['auc_macro'])}.")

    doc.h(2, "Fidelity")
    fs = m["feature_space"]
    doc.p(f"Feature space: {fs['description']}. Reference set: the held-out real test images. Each row compares "
          "an equally sized subsample of synthetic and of real training images against it; FID with its 95% "
          "bootstrap interval, KID ± its standard deviation over subsets, PRDC with k = 5. The real training "
          "images give the real-vs-real reference: the values a perfect generator could reach.")
    if "samples" in figures:
        doc.figure("samples", figures["samples"], "Synthetic (left) and real training (right) images per class")
    if "prdc" in figures:
        doc.figure("prdc", figures["prdc"], "Precision, recall, density and coverage, overall and per class: "
                   "synthetic beside the real-vs-real reference")
    header = ["set", "n", "FID [95% CI]", "KID", "precision", "recall", "density", "coverage"]
    rows = []
    for group, d in [("overall", fo), *m["fidelity"]["per_class"].items()]:
        for cand in ("synthetic", "real"):
            c = d[cand]
            kid = "n/a" if c["kid"] is None else f"{_fmt(c['kid'])} ± {_fmt(c['kid_std'])}"
            rows.append([f"{group}: {cand}", c["n_candidate"], _fmt(c["fid"]) + _ci(c["fid_ci95"]), kid,
                         c["precision"], c["recall"], c["density"], c["coverage"]])
    doc.table(header, rows)
    if rec is not None:
        doc.p("Class recognition: the fraction of each class's images that a ResNet-18 trained on the real training "
              "images assigns to that class. A synthetic image filed under another class teaches a downstream "
              "classifier the wrong boundary; the real test images give the reachable value."
              + (f" These synthetic images were kept by `augflow synthesize --select {rec['selected_by']}`, which "
                 "keeps the samples a classifier assigns to their class: their recognition is high by construction "
                 "and is not counted in the fidelity verdict." if rec.get("selected_by") else ""))
        doc.table(["class", "synthetic", "real test"],
                  [["mean over classes", rec["synthetic_mean"], rec["real_mean"]],
                   *[[n, "n/a" if rec["synthetic"][n] is None else rec["synthetic"][n],
                      "n/a" if rec["real"][n] is None else rec["real"][n]] for n in names]])

    det = m.get("detectability")
    if det is not None:
        doc.p(f"Detectability (classifier two-sample test, Lopez-Paz & Oquab 2017): the cross-validated ROC AUC of a "
              f"logistic regression that separates each set from the held-out real test images, {det['n']} images "
              "per side with the same count of every class, folds grouped by subject. 0.5: indistinguishable. A "
              "downstream classifier can learn what tells a top-up apart as a feature of the classes it fills.")
        doc.table(["space", "synthetic vs real test", "real train vs real test"],
                  [[space, "n/a" if det[space]["synthetic"] is None else det[space]["synthetic"],
                    "n/a" if det[space]["real"] is None else det[space]["real"]]
                   for space in ("features", "pixels") if space in det])

    doc.h(2, "Diversity")
    st = div["settings"]
    doc.p(f"Mean {st['method'].upper()} (window {st['win_size']}, {st['scales']} scale(s)) over {div['pairs']} "
          "random pairs per class (intra) and across classes (inter); real reference: the training images.")
    doc.table(["", "synthetic", "real"],
              [["intra-class", div["synthetic"]["intra"], div["real"]["intra"]],
               ["inter-class", div["synthetic"]["inter"], div["real"]["inter"]],
               *[[f"intra {n}", div["synthetic"]["per_class"][n], div["real"]["per_class"][n]] for n in names]])

    doc.h(2, "Memorization")
    mem = m["memorization"]
    doc.p("Distance of each synthetic image to its nearest training image (DCR) against the same distance for "
          "held-out real images. A synthetic image closer than the closest 1% of held-out images is flagged. "
          "Pixel distances also shrink when synthetic images are smoother than real ones (a latent temperature "
          "below 1 removes acquisition noise) without any copying: when only the pixel space flags images, look "
          "at the closest pairs.")
    for name, caption in (("closest_pairs", "The 16 closest synthetic-training pairs"),
                          ("dcr", "Distance to the closest training image")):
        if name in figures:
            doc.figure(name, figures[name], caption)
    doc.table(["space", "copy fraction", "threshold", "median DCR synthetic", "median DCR held-out", "ratio"],
              [[s, mem[s]["copy_fraction"], mem[s]["threshold"], mem[s]["median_synthetic"],
                mem[s]["median_heldout"], mem[s]["ratio"]] for s in ("pixel", "feature")])
    doc.p(f"Exact copies (pixel RMS <= half a grey level): {mem['exact_copies']}; near copies (closer than any "
          f"held-out image): {mem['near_copies']}.")
    if mia is not None:
        doc.h(3, "Membership inference")
        if "roc" in figures:
            doc.figure("roc", figures["roc"], "Membership-inference ROC (log FPR)")
        interval = mia.get("auc_interval")
        doc.table(["members (subjects)", "non-members (subjects)", "AUC", "AUC 95% interval (bootstrap over subjects)",
                   "TPR @ FPR 1%", "TPR @ FPR 0.1%", "epsilon lower bound"],
                  [[f"{mia['n_members']} ({mia.get('n_member_subjects') or 'n/a'})",
                    f"{mia['n_nonmembers']} ({mia.get('n_nonmember_subjects') or 'n/a'})", mia["auc"],
                    "n/a" if not interval else f"{_fmt(interval[0])}-{_fmt(interval[1])}",
                    mia["tpr_at_fpr"]["0.01"], mia["tpr_at_fpr"]["0.001"], mia["epsilon_lower_bound"]]])
        if not all(mia["fpr_resolvable"].values()):
            doc.p("Fewer non-members than 1/FPR: at that FPR the TPR shown is the one at zero false positives.")

    doc.h(2, "Settings")
    if recipe is not None:
        doc.h(3, f"Training recipe of the model ({recipe.get('name', 'unnamed')})")
        recipe = public_paths(recipe)
        doc.table(["setting", "value"], key_values(recipe))
        doc.details("Raw recipe (JSON)", json.dumps(recipe, indent=1, sort_keys=True, default=str))
    if m.get("settings"):
        doc.h(3, "Audit settings")
        doc.table(["setting", "value"], key_values(public_paths(m["settings"])))

    doc.h(2, "Inputs")
    doc.table(["role", "file", "images", "SHA-256"],
              [[role, base_name(m["inputs"][role]["path"]), m["inputs"][role]["n"], m["inputs"][role]["sha256"]]
               for role in ("real", "train", "synthetic")])
    if model:
        doc.p(f"Model: {base_name(model['path'])} (SHA-256 {model['sha256']}).")
    if m.get("command"):
        doc.p("Command (file paths as base names):")
        doc.code(public_command(m["command"]))
    return doc


def public(obj):
    """A JSON-ready copy: drops keys starting with "_" (arrays for figures), converts numpy scalars."""
    if isinstance(obj, dict):
        return {str(k): public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [public(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return public(obj.tolist())
    if isinstance(obj, np.floating | float):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_report(metrics: dict, out: str | Path, figures: dict[str, bytes]) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` (+ ``figures/*.png``) and ``report.html`` into ``out`` atomically."""
    out = Path(out)
    doc = build_document(metrics, figures)
    for name, png in figures.items():
        with atomic_path(out / "figures" / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    paths = {key: out / name for key, name in zip(("metrics", "markdown", "html"), REPORT_FILES, strict=True)}
    atomic_write_text(json.dumps(public(metrics), indent=2, sort_keys=False) + "\n", paths["metrics"])
    atomic_write_text(doc.markdown(), paths["markdown"])
    atomic_write_text(doc.html(f"augflow audit: {Path(metrics['inputs']['synthetic']['path']).name}"), paths["html"])
    return paths
