"""`tinylm eval mc`: multiple choice scored as lm-evaluation-harness scores it.

The oracle is lm-eval 0.4 itself (``lm_eval.simple_evaluate`` with its HFLM on the same
local folder, a task in its own YAML format on local JSONL files, log_samples=True):
the same prompts, per-choice log-likelihoods within 1e-5 and identical acc / acc_norm
(per document and aggregated, with their standard errors), zero-shot and 2-shot, on a
random GPT-2 and a random GQA Llama whose tokenizer adds BOS. The rest runs without
lm-eval: the shared-context KV cache against plain forwards, the readers of every
format, the few-shot sampler, generation, the command line and its errors.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from cli_helpers import one_error_line, run
from eval_helpers import (WORDS, hf_model, hflm, offline_lm_eval, tiny_gpt2, tiny_llama,
                          write_jsonl)

from tinylm.evaluation.encoding import TextEncoder
from tinylm.evaluation.fewshot import FewshotSampler, build_prompt
from tinylm.evaluation.harness import MCOptions, evaluate_mc, format_table
from tinylm.evaluation.loglik import continuation_logprobs
from tinylm.evaluation.tasks import TaskError, read_task
from tinylm.loading import load_model

DATA = __import__("pathlib").Path(__file__).parent / "data" / "eval"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc_models")
    return {"gpt2": tiny_gpt2(root / "gpt2"), "llama": tiny_llama(root / "llama")}


@pytest.fixture(scope="module")
def lms(folders):
    """lm-eval's HFLM per folder, built once (simple_evaluate takes an LM object)."""
    pytest.importorskip("lm_eval")
    return {name: hflm(hf_model(path)) for name, path in folders.items()}


@pytest.fixture(scope="module")
def loaded(folders):
    out = {}
    for name, path in folders.items():
        model, tok = load_model(path)
        out[name] = (model, TextEncoder.for_model(path, model, tok))
    return out


def _docs(seed, n):
    rnd = random.Random(seed)

    def words(lo, hi):
        return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi)))

    docs = []
    for _ in range(n):
        choices = [words(1, 4) for _ in range(rnd.randint(2, 4))]
        docs.append({"question": words(3, 8) + "?", "choices": choices,
                     "answer": rnd.randrange(len(choices)), "subject": words(1, 2)})
    return docs


# Two lm-eval tasks: Jinja templates with the few-shot pool in a train split, and field
# names with a context that ends in a space (moved to the continuation), an empty target
# delimiter, a templated description and few-shot examples from the test split itself
# (the document asked is left out of its own examples).
TASKS = {
    "templates": """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
training_split: train
test_split: test
output_type: multiple_choice
description: "Answer the questions.\\n\\n"
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "fields": """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
fewshot_split: test
output_type: multiple_choice
description: "About {{{{subject}}}}:\\n"
doc_to_text: "Q: {{{{question}}}}\\nA: "
doc_to_choice: choices
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n###\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval_tasks")
    train, test = write_jsonl(d / "train.jsonl", _docs(0, 5)), write_jsonl(d / "test.jsonl",
                                                                             _docs(1, 5))
    for style, text in TASKS.items():
        (d / f"tiny_{style}.yaml").write_text(
            text.format(name=f"tiny_{style}", train=train, test=test), encoding="utf-8")
    return d


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("model_name, style", [("gpt2", "templates"), ("llama", "fields")])
def test_same_loglikelihoods_and_accuracy_as_lm_eval(lms, loaded, task_dir, monkeypatch,
                                                     tmp_path, model_name, style, shots):
    lm_eval = offline_lm_eval(monkeypatch, tmp_path / "hf_cache")
    from lm_eval.tasks import TaskManager

    name = f"tiny_{style}"
    out = lm_eval.simple_evaluate(
        model=lms[model_name], tasks=[name], num_fewshot=shots, log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    theirs = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    model, enc = loaded[model_name]
    report = evaluate_mc(model, enc, read_task(task_dir / f"{name}.yaml"),
                         MCOptions(shots=shots, batch_size=3))
    assert len(report["samples"]) == len(theirs) == 5
    for mine, ref in zip(report["samples"], theirs):
        assert [list(a) for a in ref["arguments"]] == [
            [c, k] for c, k in zip([mine["context"]] * len(mine["continuations"]),
                                   mine["continuations"])]
        ref_ll = [float(r[0][0]) for r in ref["resps"]]
        np.testing.assert_allclose(mine["loglikelihoods"], ref_ll, rtol=0, atol=1e-5)
        assert mine["is_greedy"] == [bool(r[0][1]) for r in ref["resps"]]
        assert (mine["acc"], mine["acc_norm"]) == (ref["acc"], ref["acc_norm"])
    results = out["results"][name]
    for metric in ("acc", "acc_norm"):
        assert report["results"][metric] == results[f"{metric},none"]
        assert report["results"][f"{metric}_stderr"] == pytest.approx(
            results[f"{metric}_stderr,none"], abs=1e-12)


def test_fewshot_sampler_draws_as_lm_eval(task_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.samplers import ContextSampler

    task = read_task(task_dir / "tiny_fields.yaml")  # few-shot pool = the test split
    ref = ContextSampler(list(task.docs), rnd=1234)
    mine = FewshotSampler(task, 1234)
    for doc in task.docs * 3:
        assert mine.sample(3, doc) == ref.sample(3, eval_doc=doc)
    first = read_task(DATA / "mmlu" / "test" / "astronomy_test.csv")
    assert FewshotSampler(first, 0).sample(2, first.docs[0]) == first.fewshot_docs[:2]


# --------------------------------------------------------------------------- the cache


def test_shared_context_cache_equals_plain_forwards(loaded):
    """Requests sharing contexts (cache copied per request, contexts batched with
    padding, left truncation past the window) score as one plain forward each."""
    from tinylm.ops.nn import log_softmax_array

    rng = np.random.default_rng(0)
    requests = []
    for _ in range(6):
        ctx = rng.integers(0, 300, rng.integers(1, 30)).tolist()
        requests += [(ctx, rng.integers(0, 300, rng.integers(1, 9)).tolist()) for _ in range(3)]
    requests.append((list(range(70)), [5, 6, 7]))  # 73 tokens: 9 cut from the left
    for model, _ in loaded.values():
        for batch_size in (1, 4, 64):
            got = continuation_logprobs(model, requests, batch_size=batch_size)
            for (ctx, cont), (lp, greedy) in zip(requests, got):
                whole = (ctx + cont)[-65:]
                logits = model(np.array([whole[:-1]])).logits.data[0].astype(np.float64)
                ref = log_softmax_array(logits)[-len(cont):]
                assert lp == pytest.approx(ref[np.arange(len(cont)), cont].sum(), abs=2e-5)
                assert greedy == bool((ref.argmax(-1) == cont).all())


# --------------------------------------------------------------------------- formats


def test_readers_of_every_format():
    simple = read_task(DATA / "simple.jsonl")
    assert [d["answer"] for d in simple.docs] == [0, 1, 1, 1, 2, 1]  # index, text, letter
    assert simple.text(simple.docs[2]) == ("Tom has three apples and eats one.\nQuestion: How "
                                           "many apples does Tom have left?\nAnswer:")
    mmlu = read_task(DATA / "mmlu" / "test" / "astronomy_test.csv")
    assert mmlu.name == "mmlu_astronomy" and len(mmlu.fewshot_docs) == 3  # ../dev found
    assert mmlu.choices(mmlu.docs[0]) == ["A", "B", "C", "D"]
    assert [mmlu.target(d) for d in mmlu.docs] == [0, 1, 2, 3]
    prompt = build_prompt(mmlu, mmlu.docs[1], mmlu.fewshot_docs[:1])
    assert prompt.contexts[0] == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet is known as the red planet?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn"
        "\nAnswer: B\n\nWhat is the Sun mostly made of?\nA. Iron\nB. Hydrogen and helium\n"
        "C. Rock\nD. Water\nAnswer:")
    assert prompt.continuations == [" A", " B", " C", " D"] and prompt.gold == 1
    arc = read_task(DATA / "arc_easy.jsonl")
    assert arc.name == "arc_easy" and [arc.target(d) for d in arc.docs] == [0, 1, 2]
    assert arc.choices(arc.docs[1]) == ["It becomes a gas.", "It becomes a solid.",
                                        "It disappears."]
    hella = read_task(DATA / "hellaswag.jsonl")
    assert hella.docs[0]["query"] == ("Making tea: A person fills a kettle with water and puts "
                                      "it on the stove. They")
    assert hella.docs[0]["choices"][2] == "paint the stove. blue."
    assert [d["gold"] for d in hella.docs] == [0, 1, 2]


def test_builtin_formats_prompt_as_lm_eval_templates():
    """ARC's and MMLU's prompts equal lm-eval's own task templates rendered by its Jinja
    environment; HellaSwag's preprocessing equals lm-eval's."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.hellaswag.utils import preprocess
    from lm_eval.utils import apply_template

    arc = read_task(DATA / "arc_easy.jsonl")
    for doc in arc.docs:
        assert arc.text(doc) == apply_template("Question: {{question}}\nAnswer:", doc)
        assert arc.choices(doc) == eval(apply_template("{{choices.text}}", doc))
        assert arc.target(doc) == int(apply_template("{{choices.label.index(answerKey)}}", doc))
    mmlu = read_task(DATA / "mmlu" / "test" / "astronomy_test.csv")
    template = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}"
                "\nD. {{choices[3]}}\nAnswer:")
    for doc in mmlu.docs:
        assert mmlu.text(doc) == apply_template(template, doc)
    for raw in map(json.loads, (DATA / "hellaswag.jsonl").read_text().splitlines()):
        ctx = raw["ctx_a"] + " " + raw["ctx_b"].capitalize()
        mine = read_task(DATA / "hellaswag.jsonl").docs[raw["ind"] - 1]
        assert mine["query"] == preprocess(raw["activity_label"] + ": " + ctx)
        assert mine["choices"] == [preprocess(e) for e in raw["endings"]]


def test_lm_eval_yaml_rules(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "opts": ["x", "y"], "gold": "y", "n": 3},
                                       {"q": "b", "opts": ["x", "y"], "gold": "x"}])
    (tmp_path / "base.yaml").write_text(
        "dataset_path: json\ndataset_kwargs:\n  data_files: d.jsonl\nvalidation_split: train\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: opts\n"
        "doc_to_target: gold\n")
    (tmp_path / "t.yaml").write_text("include: base.yaml\ntask: t\ndoc_to_text: 'Q {{q}}'\n")
    task = read_task(tmp_path / "t.yaml")
    assert task.name == "t" and task.docs[1]["n"] is None  # missing columns are None
    assert task.text(task.docs[0]) == "Q a" and task.target(task.docs[0]) == "y"
    prompt = build_prompt(task, task.docs[0], [task.docs[1]])
    assert prompt.contexts[0] == "Q b x\n\nQ a" and prompt.gold == 1


# --------------------------------------------------------------------------- generation


def test_generation_matches_the_models_own_greedy_answer(loaded, tmp_path):
    """A generate_until task whose targets are what the model answers greedily (found
    with tinylm.generate) scores 1 on each; shifted targets score 0."""
    from tinylm.evaluation.generation import GenOptions, evaluate_generation
    from tinylm.generate import generate

    model, enc = loaded["gpt2"]
    questions = ["the cat", "a red house", "far away"]
    prompts = [f"Q: {q}\nA:" for q in questions]
    out = generate(model, [enc.encode(p) for p in prompts], 3, temperature=0.0)
    answers = [enc.tokenizer.decode(t) for t in out.tokens]
    rows = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    yaml = ("task: gen\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: gen.jsonl}\n"
            "test_split: test\noutput_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
            "doc_to_target: answer\ngeneration_kwargs:\n  max_gen_toks: 3\n  until: ['@@']\n")
    (tmp_path / "gen.yaml").write_text(yaml)
    report = evaluate_generation(model, enc, read_task(tmp_path / "gen.yaml"), GenOptions())
    assert [s["output"] for s in report["samples"]] == answers
    assert report["results"]["exact_match"] == 1.0
    write_jsonl(tmp_path / "gen.jsonl", [{"question": q, "answer": a + "!"}
                                        for q, a in zip(questions, answers)])
    report = evaluate_generation(model, enc, read_task(tmp_path / "gen.yaml"), GenOptions())
    assert report["results"]["exact_match"] == 0.0


def test_generation_prompts_and_extraction(loaded):
    from tinylm.evaluation.generation import (GenOptions, _exact_match, evaluate_generation,
                                              regex_extract)

    model, enc = loaded["gpt2"]
    task = read_task(DATA / "simple.jsonl")
    report = evaluate_generation(model, enc, task, GenOptions(
        shots=1, limit=2, chat_template="chatml", max_new_tokens=2))
    first = report["samples"][0]
    assert first["prompt"].startswith("<|im_start|>user\nAnswer with the letter")
    assert "Input: What color is the sky on a clear day?\nA. blue\nB. green\nC. red\nOutput:" \
        in first["prompt"]
    assert first["target"] == "A" and report["n"] == 2
    cot = evaluate_generation(model, enc, task, GenOptions(cot=True, limit=1, max_new_tokens=2))
    assert cot["samples"][0]["prompt"].endswith("A: Let's think step by step.")
    assert regex_extract("so B, then C", r"\b([A-Z])\b", -1) == "C"
    assert regex_extract("#### 42", r"#### (\-?[0-9\.\,]+)") == "42"
    assert regex_extract("none", r"(\d+)") == "[invalid]"
    assert regex_extract("x=7", r"(a)|(\d)") == "7"  # a tuple: its first non-empty group
    assert _exact_match("The Cat.", "the cat", {"ignore_case": True,
                                                "ignore_punctuation": True}) == 1.0
    assert _exact_match("cat", "dog", {}) == 0.0


# --------------------------------------------------------------------------- command line


def test_cli_mc_table_json_and_report(folders, tmp_path):
    out = tmp_path / "report.json"
    result = run("eval", "mc", "-m", folders["gpt2"], "--task", DATA / "lmeval_task.yaml",
                 "--no-progress", "-o", out)
    assert result.exit_code == 0, result.output
    assert "sample_qa (4 documents, 2-shot)" in result.output and "acc_norm" in result.output
    report = json.loads(out.read_text())
    assert report["shots"] == 2 and len(report["samples"]) == 4
    assert all(len(s["loglikelihoods"]) == len(s["continuations"]) for s in report["samples"])
    table = format_table(report)
    assert table.splitlines()[2].startswith("acc ")
    result = run("eval", "mc", "-m", folders["gpt2"], "--task", DATA / "hellaswag.jsonl",
                 "--shots", "1", "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["n"] == 3 and set(summary["results"]) == {
        "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_bytes", "acc_bytes_stderr"}
    result = run("eval", "mc", "-m", folders["gpt2"], "--task", DATA / "lmeval_generate.yaml",
                 "--no-progress", "--json")
    assert result.exit_code == 0 and "exact_match" in json.loads(result.output)["results"]


@pytest.mark.parametrize("lines, fragments", [
    (['{"question": "q", "choices": ["a", "b"]}'], ["bad.jsonl:1", "missing 'answer'"]),
    (['{"question": "q", "choices": ["a", "b"], "answer": 5}'], ["bad.jsonl:1", "answer 5"]),
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', "{oops"], ["bad.jsonl:2"]),
])
def test_bad_task_files_are_one_error_line(folders, tmp_path, lines, fragments):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    one_error_line(run("eval", "mc", "-m", folders["gpt2"], "--task", tmp_path / "bad.jsonl"),
                   *fragments)


def test_task_files_that_run_code_or_download_are_refused(folders, tmp_path):
    (tmp_path / "f.yaml").write_text("task: f\ndataset_path: json\nprocess_docs: !function "
                                     "utils.process_docs\n")
    one_error_line(run("eval", "mc", "-m", folders["gpt2"], "--task", tmp_path / "f.yaml"),
                   "!function utils.process_docs", "does not")
    (tmp_path / "hub.yaml").write_text("task: h\ndataset_path: cais/mmlu\ntest_split: test\n"
                                       "output_type: multiple_choice\n")
    one_error_line(run("eval", "mc", "-m", folders["gpt2"], "--task", tmp_path / "hub.yaml"),
                   "cais/mmlu", "data_files")
    one_error_line(run("eval", "mc", "-m", folders["gpt2"], "--task", DATA / "simple.jsonl",
                       "--shots", "9"), "9 few-shot examples")
    one_error_line(run("eval", "mc", "-m", folders["gpt2"], "--task", DATA / "simple.jsonl",
                       "--cot"), "--generate")
    with pytest.raises(TaskError, match="--format"):
        read_task(DATA / "glue" / "sst2_dev.tsv")


def test_templates_without_jinja_render_the_common_forms():
    from tinylm.evaluation.template import TemplateError, _render_simple, render

    doc = {"question": "  Why?  ", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
           "n": 3}
    for template in ("{{question.strip()}}\nA. {{choices.text[0]}}", "{{ choices.text }}",
                     "{{choices['label'][1]}}-{{n}}"):
        assert _render_simple(template, doc) == render(template, doc)  # Jinja's answer
    with pytest.raises(TemplateError, match="jinja2"):
        _render_simple("{% if n %}x{% endif %}", doc)
    with pytest.raises(TemplateError, match="jinja2"):
        _render_simple("{{choices.label.index('A')}}", doc)
    with pytest.raises(TemplateError, match="does not have"):
        _render_simple("{{missing}}", doc)
