"""The counts of an extraction: per document and overall, by kind and by cause (training_stats.json).

Deliberately left out: producing the records (``memchat.extraction``) and the file's
format name and version (``memchat.formats``).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

from . import formats


def _now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _counter_dict(c: Counter | dict) -> dict:
    return {k: v for k, v in sorted(c.items()) if v}


def dataset_stats(selected, results, records, drops, display) -> dict:
    per_doc: dict[str, dict] = {}
    for c in selected:
        d = per_doc.setdefault(c["document"], _empty_doc_stats(c["version"]))
        d["chunks"] += 1
        r = results.get(c["hash"])
        if r is None:
            d["chunks_without_result"] += 1
            continue
        cnt = r["counts"]
        d["questions_generated"] += cnt.get("questions_generated", 0)
        d["retry_prompts"] += cnt.get("retry_prompts", 0)
        d["questions_from_retry"] += cnt.get("retry_kept", 0)
        d["variations_generated"] += cnt.get("variations_generated", 0)
        d["answers"]["model"] += cnt.get("answers_model", 0)
        d["answers"]["extractive"] += cnt.get("answers_extractive", 0)
        d["answers"]["reader"] += cnt.get("answers_reader", 0)
        d["generated_tokens"] += r.get("tokens", {}).get("new", 0)
        for part, key in (("questions_tally", "questions"), ("answers_tally", "answers_parse"),
                          ("variations_tally", "variations")):
            t = r.get(part, {})
            d["repaired"][key].update(t.get("repaired", {}))
            d["dropped"][key].update(t.get("dropped", {}))
    for doc, reasons in drops.items():
        for reason, n in reasons.items():
            key = ("variations" if reason.startswith("variation_") else
                   "restatements" if reason.startswith("restatement_") else "questions")
            per_doc[doc]["dropped"][key][reason] += n
    for rec in records:
        d = per_doc[rec["document"]]
        d["records"] += 1
        d["records_" + rec["split"]] += 1
        d["records_by_kind"][rec["kind"]] += 1
        if rec["split"] == "validation":
            d["validation_by_kind"][rec["kind"]] += 1
        if rec["kind"] == "original":
            d["questions_kept"] += 1
            d["families_" + rec["split"]] += 1
        elif rec["split"] == "validation" and rec["kind"] == "wh":
            d["span_probes"] += 1
        elif rec["kind"] == "variation":
            d["variations_kept"] += 1
        if rec.get("answer_kind"):
            d["span_answers_by_kind"][rec["answer_kind"]] += 1
    overall = _empty_doc_stats(None)
    for d in per_doc.values():
        _add_into(overall, d)
    out_docs = {name: _finish_doc(d) for name, d in sorted(per_doc.items())}
    overall = _finish_doc(overall)
    overall.pop("version", None)
    return {
        "format": formats.STATS_FORMAT,
        "format_version": formats.STATS_FORMAT_VERSION,
        "created": _now_iso(),
        "overall": overall,
        "documents": out_docs,
        "generation": {"model": display},
        "notes": {
            "answers.extractive": "answers repaired with the chunk sentence that best answers the question, "
            "used where the model's answer was unusable or not grounded in the chunk",
            "dropped": "by reason; questions: parsing problems and filters; answers_parse: why a model answer "
            "was rejected before the extractive repair (the question is kept when the repair succeeds); "
            "restatements: items too close to a validation question (the leakage rule)",
            "records_by_kind": "document = a chunk's text (LM loss on all tokens); original = generated question; "
            "variation = its paraphrase; wh / cloze = a sentence's answer span asked for; about = a sentence "
            "asked for by its topic; facts = the sentences about one name, as a list",
            "split": "validation holds out question families (a question and its paraphrases) of chunks that "
            "are also trained on; every chunk is in training. span_probes: validation wh questions about answer "
            "spans no training item asks for, in trained sentences",
        },
    }


def run_stats(wall, load_seconds, gen, selected, generated, reused, calls, before, stage_seconds=None) -> dict:
    out = {
        "wall_time_s": round(wall, 2),
        "model_load_s": round(load_seconds, 2),
        "chunks_selected": selected,
        "chunks_generated": generated,
        "chunks_reused": reused,
        "generate_calls": calls,
        # where the time went: generate calls per stage, and the reader's answering ("reading")
        "stage_seconds": {k: round(v, 2) for k, v in (stage_seconds or {}).items()},
    }
    if before is not None and gen is not None:
        s = gen.stats
        new = s.new_tokens - before.new_tokens
        secs = s.seconds - before.seconds
        out.update(
            generated_tokens=new,
            prompt_tokens=s.prompt_tokens - before.prompt_tokens,
            prompts=s.prompts - before.prompts,
            generation_time_s=round(secs, 2),
            tokens_per_s=round(new / secs, 1) if secs > 0 else None,
            # everything but loading models, over the time inside generate: the pipeline's overhead
            wall_over_generation=round((wall - load_seconds) / secs, 3) if secs > 0 else None,
        )
    return out


def _empty_doc_stats(version) -> dict:
    return {
        "version": version,
        "chunks": 0,
        "chunks_without_result": 0,
        "questions_generated": 0,
        "retry_prompts": 0,
        "questions_from_retry": 0,
        "questions_kept": 0,
        "variations_generated": 0,
        "variations_kept": 0,
        "records": 0,
        "records_train": 0,
        "records_validation": 0,
        "families_train": 0,
        "families_validation": 0,
        "span_probes": 0,
        "records_by_kind": Counter(),
        "validation_by_kind": Counter(),
        "span_answers_by_kind": Counter(),
        "answers": Counter(),
        "repaired": {k: Counter() for k in ("questions", "answers_parse", "variations")},
        "dropped": {k: Counter() for k in ("questions", "answers_parse", "variations", "restatements")},
        "generated_tokens": 0,
    }


def _add_into(total: dict, d: dict) -> None:
    for k, v in d.items():
        if k == "version":
            continue
        if isinstance(v, dict) and not isinstance(v, Counter):
            for kk, c in v.items():
                total[k][kk].update(c)
        elif isinstance(v, Counter):
            total[k].update(v)
        else:
            total[k] += v


def _finish_doc(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Counter):
            out[k] = ({src: v.get(src, 0) for src in ("model", "reader", "extractive")} if k == "answers"
                      else _counter_dict(v))
        elif isinstance(v, dict):
            out[k] = {kk: _counter_dict(c) for kk, c in v.items()}
        else:
            out[k] = v
    out["dropped_total"] = {k: sum(c.values()) for k, c in out["dropped"].items()}
    return out
