"""The settings of `kdtrain run` (TrainConfig) and `kdtrain eval` (EvalConfig): the one definition of their options.

Each field is written once: its type (a Literal lists the choices), its default and, right under it, its help.
The commands' options, a plan's `train` and `eval` sections, a config file (`kdtrain run --config`) and a chain
stage's command line are derived from these classes (common.settings); their checks run however they are made.
Messages name fields as `{field}` (`--lr` on a command line, `train.lr` in a plan).

Knows the settings and their limits; imports no torch and no model (the CLI reads it to build --help).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from common.settings import check_choices
from common.templates import PROMPT_TEMPLATES
from trainer.errors import EvalError, TrainError

LOSSES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "ce")
COMPILE_SETTINGS = ("auto", "on", "off")
# Fraction of a cache's sequences held out for evaluation (trainer/data.py's rule), unless a run says otherwise.
EVAL_FRACTION = 0.05
# Largest --lr: AdamW moves each weight by about lr per step, and weights are of order 1 or smaller, so above
# this every step rewrites the weights and the loss diverges (--lr 1e30 trained NaN and saved it).
MAX_LR = 1.0
# --temperature divides logits; outside this range the tempered distributions are one-hot or flat to float32
# precision (no published KD recipe leaves 0.5-10), and T^2 scales the KD term by up to 1e4.
TEMPERATURE_RANGE = (0.01, 100.0)
# Optional logging packages: setting -> (the module it imports, the kdcache extra that installs it).
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}

METRICS = ("ppl", "agreement", "rouge", "gsm8k", "mauve", "bertscore", "acceptance", "grounding",
           "exposure", "speculative")
MINILLM_SEEDS = (10, 20, 30, 40, 50)
# Appended to each GSM8K question (after a blank line) so the answer ends in the form the metric and
# `kdcache build --filter gsm8k-answer` read. examples/prepare_gsm8k.py adds the same line to training prompts.
GSM8K_INSTRUCTION = ("Solve the problem step by step, then write the final answer as a number alone on the last "
                     "line, after '#### '.")

# Field metadata: what a plan does not set (the runner does, or the chain never uses it), and what does not change
# what a command computes (where it writes, how it resumes or logs): left out of a chain stage's identity.
RUNNER = {"plan": False}
OUTPUT = {"plan": False, "identity": False}
NO_CACHE = {"plan": False}  # the no-cache path (plain CE on a data set); a chain always trains from caches


@dataclass
class TrainConfig:
    """Settings of one `kdtrain run`."""

    SECTION: ClassVar[str] = "train"

    out: str = field(metadata=OUTPUT)
    """Output folder: the student (save_pretrained), metrics.jsonl, run.json, checkpoints/."""
    cache: str | None = field(default=None, metadata=OUTPUT)
    """Teacher cache (folder or URL). Without it, {dataset} trains plain cross-entropy."""
    mix_cache: str | None = field(default=None, metadata=OUTPUT)
    """A second teacher cache of the same tokenizer: each batch comes from it with probability {mix}, decided by
    {seed} and the batch's number (trainer/mixed.py); its held-out sequences are left out too."""
    mix: float = field(default=0.0, metadata=RUNNER)
    """Share of batches drawn from {mix_cache}, in [0, 1]: GKD's 1 - lambda when {cache} holds the student's own
    samples and {mix_cache} the teacher's or the data's text."""
    student: str | None = field(default=None, metadata=RUNNER)
    """Student: a hub id or local model folder."""
    student_from_teacher: bool = field(default=False, metadata=RUNNER)
    """Student = the cache's teacher keeping {keep_layers} evenly spaced layers."""
    keep_layers: int | None = field(default=None, metadata=RUNNER)
    """Layers kept by {student_from_teacher}."""
    student_config: str | None = field(default=None, metadata=RUNNER)
    """Student = random init from this JSON config (with model_type); uses the teacher's tokenizer."""
    teacher: str | None = field(default=None, metadata=OUTPUT)
    """Teacher folder for {student_from_teacher} / {student_config} (default: the cache's teacher.path)."""
    loss: Literal[LOSSES] = "fkl"
    """fkl | rkl | jsd | skl | srkl | tvd | ce (plain cross-entropy on the real next token)."""
    alpha: float = 0.0
    """Weight of cross-entropy on the real next token: alpha * CE + (1 - alpha) * T^2 * KD."""
    temperature: float = 1.0
    """Distillation temperature (both distributions re-tempered; see docs/losses.md)."""
    beta: float = 0.5
    """JSD mixing weight, in (0, 1)."""
    skew: float = 0.1
    """Skew of skl / srkl (DistiLLM), in [0, 1)."""
    target_bucket: bool = True
    """Give the actual next token its own bucket where it is outside the teacher's top K (K + 2 outcomes; uses the
    cache's target_logprob; docs/losses.md). Off: K + 1 buckets. Not used with tail samples."""
    tail_samples: bool = True
    """With {loss} fkl, use the cache's tail samples (a cache built with kdcache build --tail-samples): the K top-K
    entries plus M importance-weighted draws from the tail replace the rest bucket (docs/losses.md)."""
    steps: int | None = None
    """Optimizer steps (default: {epochs} over the training sequences); may grow on {resume} (the extra steps run at
    the schedule's final learning rate)."""
    epochs: float = 1.0
    """Passes over the training sequences when {steps} is not given (with {mix_cache}: over {cache}'s, the batches
    drawn from the mix cache coming on top)."""
    lr: float = 5e-4
    """Peak learning rate (AdamW, betas 0.9/0.95)."""
    warmup_steps: int = 0
    """Linear warm-up steps; then cosine decay to 10% of {lr}."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    batch_tokens: int = 4096
    """Tokens per micro-batch per rank, padding included: rows x longest sequence, or with packing rows x the
    longest sequence of the data."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    bf16: bool = False
    """bfloat16 autocast for the student's forward."""
    pack: bool = True
    """Pack sequences into rows of the data's longest sequence (no padding but at each row's end) when the student
    keeps packed sequences apart (checked on it); off: one right-padded sequence per row."""
    compile: Literal[COMPILE_SETTINGS] = "auto"
    """torch.compile the student's forward: auto (on CUDA only), on, off."""
    data_workers: int | None = None
    """Processes that read and collate batches (0: one thread in the training process; default 4 on CUDA, 0 on a
    CPU)."""
    peak_tflops: float | None = None
    """The device's peak TFLOP/s for the logged MFU (default: the data-sheet bf16 figure of a known GPU under
    {bf16}; otherwise MFU is not logged)."""
    seed: int = 0
    """Seed of the data order and of a random student init."""
    eval_every: int = 0
    """Evaluate every N steps, and at step 0 (0: only at the end)."""
    eval_fraction: float = EVAL_FRACTION
    """Fraction of sequences held out for evaluation (rule in trainer/data.py)."""
    eval_max_sequences: int = 64
    """At most this many held-out sequences per evaluation (the first ones in storage order)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: none besides the final model)."""
    resume: bool = field(default=False, metadata=OUTPUT)
    """Continue from the latest checkpoint in {out} (same settings); without one, start the run in {out} over."""
    overwrite: bool = field(default=False, metadata=OUTPUT)
    """Replace a non-empty {out} that holds a kdtrain run."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <out>/tensorboard (the extra kdcache[tensorboard])."""
    wandb: bool = field(default=False, metadata={"identity": False})
    """Also log to Weights & Biases (the extra kdcache[wandb]); WANDB_MODE=offline writes <out>/wandb only, for a
    later `wandb sync`."""
    wandb_project: str = field(default="kdcache", metadata={"identity": False})
    """The Weights & Biases project of {wandb}."""
    dataset: str | None = field(default=None, metadata=NO_CACHE)
    """No-cache path: data set to train on with {loss} ce (tokenized with the student's tokenizer)."""
    split: str | None = field(default=None, metadata=NO_CACHE)
    """No-cache path: split."""
    text_field: str | None = field(default=None, metadata=NO_CACHE)
    """No-cache path: text field."""
    prompt_field: str | None = field(default=None, metadata=NO_CACHE)
    """No-cache path: prompt field."""
    response_field: str | None = field(default=None, metadata=NO_CACHE)
    """No-cache path: response field."""
    prompt_template: Literal[PROMPT_TEMPLATES] | None = field(default=None, metadata=NO_CACHE)
    """No-cache path: prompt format of prompt/response data, as kdcache build's (chat, plain, minillm; default chat
    when the tokenizer has a chat template, else plain)."""
    input_field: str | None = field(default=None, metadata=NO_CACHE)
    """No-cache path: with {prompt_template} minillm, the field of its '### Input:' section (dolly's context)."""
    max_length: int = field(default=256, metadata=NO_CACHE)
    """No-cache path: window length."""
    limit: int | None = field(default=None, metadata=NO_CACHE)
    """No-cache path: first N source rows only."""
    stop_after: int | None = field(default=None, metadata={"plan": False, "hidden": True})
    """Checkpoint and stop after this step, as if killed (tests of {resume})."""
    trace_data: bool = field(default=False, metadata={"plan": False, "hidden": True})
    """Write the (shard, sequence) ids each rank trains on to <out>/trace/rank-R.jsonl."""
    skip_nonfinite: int = 0
    """Skip up to N optimizer steps whose loss or gradient norm is not finite (their batches are dropped, nothing
    is updated; each skip is counted in metrics.jsonl) before stopping; 0: the first one stops the run."""
    gradient_checkpointing: bool = field(default=False, metadata={"identity": False})  # same loss and gradients
    """Recompute each layer's activations in the backward pass instead of keeping them (transformers' gradient
    checkpointing), for students that do not fit otherwise: a step holds about one layer's activations instead of
    every layer's, for about one more forward per step; the loss and gradients are the same."""

    def __post_init__(self):
        self._check_finite()
        check_choices(self, TrainError)
        if not 0.0 <= self.alpha <= 1.0:
            raise TrainError(f"{{alpha}} must be in [0, 1] (it weighs CE against KD), got {self.alpha}")
        if not self.temperature > 0:
            raise TrainError(f"{{temperature}} must be > 0 (1.0 means no tempering), got {self.temperature}")
        if self.loss == "jsd" and not 0.0 < self.beta < 1.0:
            raise TrainError(f"{{beta}} must be in (0, 1) for {{loss}} jsd (at 0 or 1 the JSD is 0), got {self.beta}")
        if self.loss in ("skl", "srkl") and not 0.0 <= self.skew < 1.0:
            raise TrainError(f"{{skew}} must be in [0, 1) for {{loss}} {self.loss}, got {self.skew}")
        self._check_student()
        self._check_data()
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"{{steps}} must be >= 1, got {self.steps}")
        for name in ("epochs", "lr"):
            if not getattr(self, name) > 0:
                raise TrainError(f"{{{name}}} must be > 0, got {getattr(self, name)}")
        for name, low in (("batch_tokens", 2), ("grad_accum", 1), ("log_every", 1), ("warmup_steps", 0),
                          ("eval_every", 0), ("save_every", 0), ("max_length", 2), ("clip", 0), ("weight_decay", 0)):
            if getattr(self, name) < low:
                raise TrainError(f"{{{name}}} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            raise TrainError(f"{{eval_fraction}} must be in [0, 1), got {self.eval_fraction}")
        if self.resume and self.overwrite:
            raise TrainError("{resume} and {overwrite} contradict each other; pass one")
        if self.data_workers is not None and self.data_workers < 0:
            raise TrainError(f"{{data_workers}} must be >= 0 (0: read in a thread of the training process), "
                             f"got {self.data_workers}")
        if self.peak_tflops is not None and not (self.peak_tflops > 0 and math.isfinite(self.peak_tflops)):
            raise TrainError(f"{{peak_tflops}} must be a finite number > 0 (the device's peak, e.g. 989 for an H100 "
                             f"in bf16), got {self.peak_tflops}")
        self._check_numbers()
        self._check_loggers()

    def _check_student(self) -> None:
        chosen = [name for name in ("student", "student_from_teacher", "student_config") if getattr(self, name)]
        if len(chosen) != 1:
            raise TrainError("give exactly one of {student}, {student_from_teacher} (with {keep_layers}), "
                             "{student_config}" + (f"; got {' and '.join('{' + c + '}' for c in chosen)}" if chosen
                                                   else "; got none"))
        if self.student_from_teacher and (self.keep_layers is None or self.keep_layers < 1):
            raise TrainError("{student_from_teacher} needs {keep_layers} N (N >= 1)")
        if self.keep_layers is not None and not self.student_from_teacher:
            raise TrainError("{keep_layers} only applies to {student_from_teacher}")

    def _check_data(self) -> None:
        if self.cache is None and self.dataset is None:
            raise TrainError("give {cache} (distillation) or {dataset} (plain cross-entropy with {loss} ce)")
        if self.cache is not None and self.dataset is not None:
            raise TrainError("give {cache} or {dataset}, not both ({loss} ce with {cache} trains on the cache's "
                             "tokens)")
        if self.cache is not None and (self.prompt_template is not None or self.input_field is not None):
            raise TrainError("{prompt_template} and {input_field} format {dataset}'s prompts; a cache's prompts were "
                             "formatted when it was built (kdcache build --prompt-template)")
        if self.cache is None and self.loss != "ce":
            raise TrainError(f"without {{cache}} there is no teacher: use {{loss}} ce (got {{loss}} {self.loss})")
        if self.cache is None and (self.student_from_teacher or self.student_config) and self.teacher is None:
            raise TrainError("without {cache}, {student_from_teacher} and {student_config} need {teacher} FOLDER")
        if not (isinstance(self.mix, (int, float)) and 0.0 <= self.mix <= 1.0):
            raise TrainError(f"{{mix}} is the share of batches drawn from {{mix_cache}}: it must be in [0, 1], got "
                             f"{self.mix}")
        if (self.mix_cache is None) != (self.mix == 0):
            raise TrainError("{mix_cache} and {mix} go together: a second cache and the share of batches drawn from "
                             "it (> 0); give both, or neither")
        if self.mix_cache is not None and self.cache is None:
            raise TrainError("{mix_cache} mixes a second cache into {cache}'s batches: give {cache} too")

    def _check_finite(self) -> None:
        """Non-finite numbers are refused before anything runs (--lr inf trained a NaN student with exit 0)."""
        for name in ("alpha", "temperature", "beta", "skew", "epochs", "lr", "weight_decay", "clip", "eval_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise TrainError(f"{{{name}}} must be a finite number, got {value}")

    def _check_numbers(self) -> None:
        """Absurd numbers are refused before anything runs (--lr 1e30 trained a NaN student with exit 0)."""
        if not 0 < self.lr <= MAX_LR:
            raise TrainError(f"{{lr}} must be in (0, {MAX_LR}] (AdamW moves each weight by about lr per step; typical "
                             f"values are 1e-5 to 1e-2), got {self.lr}")
        if not (self.weight_decay >= 0 and self.lr * self.weight_decay < 1):
            raise TrainError(f"{{weight_decay}} must be >= 0 with {{lr}} x {{weight_decay}} < 1 (AdamW multiplies the "
                             f"weights by 1 - lr x weight_decay each step; at 1 or more it zeroes or flips them), got "
                             f"{{weight_decay}} {self.weight_decay} with {{lr}} {self.lr}")
        low, high = TEMPERATURE_RANGE
        if not low <= self.temperature <= high:
            raise TrainError(f"{{temperature}} must be in [{low}, {high}] (1.0 means no tempering), got "
                             f"{self.temperature}")
        if self.skip_nonfinite < 0:
            raise TrainError(f"{{skip_nonfinite}} must be >= 0, got {self.skip_nonfinite}")

    def _check_loggers(self) -> None:
        """An optional logger whose package is missing is refused now, before {out} is created or written."""
        for name, (module, extra) in LOGGERS.items():
            if getattr(self, name) and importlib.util.find_spec(module) is None:
                raise TrainError(f"{{{name}}} needs the {module} package, which is not installed: pip install "
                                 f"'kdcache[{extra}]' (or drop {{{name}}})")


@dataclass
class EvalConfig:
    """Settings of one `kdtrain eval`."""

    SECTION: ClassVar[str] = "eval"

    model: str = field(metadata=OUTPUT)
    """Model folder (or hub id) to evaluate."""
    metrics: tuple[str, ...] = ("ppl",)
    """Metrics to compute, comma-separated: ppl, agreement, rouge, gsm8k, mauve, bertscore, acceptance, grounding,
    exposure, speculative (docs/evaluation.md)."""
    dataset: str | None = None
    """Evaluation data (ppl, rouge, gsm8k, mauve, bertscore, grounding): a local file, builtin:NAME or a hub name."""
    dataset_config: str | None = None
    """Configuration (subset) of a hub data set that has several, e.g. main for openai/gsm8k."""
    cache: str | None = field(default=None, metadata=OUTPUT)
    """Teacher cache: agreement and acceptance, and ppl on its held-out rows when there is no {dataset}."""
    teacher: str | None = field(default=None, metadata=OUTPUT)
    """acceptance: the teacher model folder (the exact alpha, also on continuations it samples); without it, bounds
    from the cache's top-K. exposure: the teacher that scores the model's own samples. speculative: the teacher
    the model drafts for."""
    split: str | None = None
    """Split of the evaluation data set (default: train)."""
    text_field: str | None = None
    """ppl on plain text: the field holding the text (default 'text')."""
    prompt_field: str | None = None
    """Prompt field (rouge, gsm8k, mauve, bertscore, grounding; ppl on prompt/response data counts response tokens
    only)."""
    response_field: str | None = None
    """Reference response field."""
    input_field: str | None = None
    """rouge and grounding: the 'input' (context) field of instruction data (dolly's context)."""
    max_length: int = 512
    """ppl: window length in tokens; rouge, gsm8k: prompt + response limit."""
    max_prompt_length: int = 256
    """rouge, gsm8k: the longest prompt in tokens (MiniLLM: 256); longer prompts are skipped and counted."""
    limit: int | None = None
    """Evaluate on the first N examples or windows only."""
    seeds: tuple[int, ...] = MINILLM_SEEDS
    """rouge: sampling seeds (MiniLLM uses 10..50)."""
    greedy: bool = False
    """rouge: greedy decoding instead of sampling (then one pass, no seeds)."""
    batch_size: int = 8
    """Sequences per forward or generation batch."""
    gsm8k_instruction: str = GSM8K_INSTRUCTION
    """gsm8k: the line appended to each question ('' for none)."""
    bertscore_layers: int | None = None
    """bertscore: the feature model's layer (default: bert_score's tuned layer for a folder named like a model it
    knows, e.g. roberta-large -> 17, else the folder's last layer, config num_hidden_layers)."""
    heldout_only: bool = field(default=True, metadata={"plan": False, "flag": "--heldout-only", "off": "--all-rows"})
    """agreement, acceptance and ppl on a cache: only the cache's held-out rows (the trainer's held-out rule); off:
    every row, training rows included."""
    eval_fraction: float | None = field(default=None, metadata={"plan": False})
    """Held-out fraction of the cache's sequences (default: the evaluated run's, from its run.json, else the
    trainer's default); on a run, at most the run's (docs/runs-and-plans.md 2)."""
    num_draft_tokens: int = 3
    """speculative: tokens the model drafts per teacher forward (gamma; vLLM's num_speculative_tokens)."""
    num_new_tokens: int = 64
    """speculative: tokens generated per prompt (end-of-sequence tokens do not stop it)."""
    speculative_temperature: float = 0.0
    """speculative: the teacher's sampling temperature; 0 is greedy decoding, where a drafted token is accepted
    exactly when it is the teacher's argmax."""
    out: str | None = field(default=None, metadata=OUTPUT)
    """Write all numbers to this JSON file."""

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise EvalError(f"unknown metric(s) {unknown} in {{metrics}}; choose from {', '.join(METRICS)}")
        if "agreement" in self.metrics and not self.cache:
            raise EvalError("metric 'agreement' needs {cache} (a teacher cache to compare with)")
        if "acceptance" in self.metrics and not self.cache:
            raise EvalError("metric 'acceptance' needs {cache} (held-out text and the teacher's top-K there); add "
                            "{teacher} MODEL for the exact value")
        if "exposure" in self.metrics and not (self.cache and self.teacher):
            raise EvalError("metric 'exposure' needs {cache} (its held-out prompts) and {teacher} (the model that "
                            "scores the evaluated model's own samples; trainer/exposure.py)")
        if "speculative" in self.metrics and not (self.teacher and (self.cache or self.dataset)):
            raise EvalError("metric 'speculative' needs {teacher} (the model drafts for it in vLLM) and prompts: "
                            "{cache} (its held-out sequences) or {dataset}")
        if self.teacher and not {"acceptance", "exposure", "speculative"} & set(self.metrics):
            raise EvalError("{teacher} is used by metrics 'acceptance', 'exposure' and 'speculative' only: add one to "
                            "{metrics}, or drop {teacher}")
        if "grounding" in self.metrics and not self.prompt_field:
            raise EvalError("metric 'grounding' needs {prompt_field} (and {input_field} for the context, dolly's "
                            "context)")
        needs_data = [m for m in self.metrics if m in ("rouge", "gsm8k", "mauve", "bertscore", "grounding")]
        if "ppl" in self.metrics and not (self.dataset or self.cache):
            needs_data.append("ppl (or {cache}: its held-out sequences)")
        if needs_data and not self.dataset:
            raise EvalError(f"metric(s) {', '.join(needs_data)} need {{dataset}}")
        for m in ("rouge", "gsm8k", "mauve", "bertscore"):
            if m in self.metrics and not (self.prompt_field and self.response_field):
                raise EvalError(f"metric {m!r} needs {{prompt_field}} and {{response_field}} (prompts and references)")
        if self.max_length < 2:
            raise EvalError(f"{{max_length}} must be >= 2, got {self.max_length}")
        if self.eval_fraction is not None and not (math.isfinite(self.eval_fraction) and 0 <= self.eval_fraction < 1):
            raise EvalError(f"{{eval_fraction}} must be a finite number in [0, 1) (the fraction of the cache's "
                            f"sequences held out), got {self.eval_fraction}")
        if self.num_draft_tokens < 1 or self.num_new_tokens < 2:
            raise EvalError(f"{{num_draft_tokens}} must be >= 1 and {{num_new_tokens}} >= 2 (the teacher makes the "
                            f"first token alone), got {self.num_draft_tokens} and {self.num_new_tokens}")
        if not (math.isfinite(self.speculative_temperature) and self.speculative_temperature >= 0):
            raise EvalError(f"{{speculative_temperature}} must be a finite number >= 0 (0: greedy), got "
                            f"{self.speculative_temperature}")
        if self.bertscore_layers is not None and self.bertscore_layers < 1:
            raise EvalError(f"{{bertscore_layers}} must be >= 1, got {self.bertscore_layers}")
