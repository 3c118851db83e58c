"""Grader configs: one typed model per grader type, in OpenAI's shapes and field names.

Reads nothing by itself; `read_graders_file` reads a JSON or YAML file of graders (one grader object
or a list, so an OpenAI grader JSON pastes in unchanged). The models check at load time what can be
checked without data: a python grader's source parses and defines grade(sample, item); a multi
grader's formula is safe arithmetic over its graders' names; label_model's passing labels are
labels; names are unique. Fields beyond OpenAI's (base_url, api_key_env, timeouts, concurrency) say
where and how a grader runs here; each default is written once, below.

Light on purpose (pydantic, yaml and the standard library; jinja2 only when a template is checked):
config.py imports it for eval.graders, so it sits below config in the core (docs/architecture.md) and
holds the YAML key -> line map both use for error messages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from tunelab.errors import ConfigError
from tunelab.specs.formula import formula_names

OPENAI_BASE_URL = "https://api.openai.com/v1"
TEXT_SIMILARITY_METRICS = (
    "fuzzy_match", "bleu", "gleu", "meteor", "cosine", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputText(_Spec):
    """A content part of a judge message (OpenAI's input_text / output_text parts)."""

    type: Literal["input_text", "output_text", "text"] = "input_text"
    text: str


def _templates_ok(template: str, namespaces: tuple[str, ...] = ("sample", "item")) -> str:
    """The template, when it parses and reads only these namespaces (else a ValueError for pydantic)."""
    from tunelab.specs.templates import TemplateProblem, check_template

    try:
        check_template(template, namespaces)
    except TemplateProblem as err:
        raise ValueError(str(err)) from None
    return template


class JudgeMessage(_Spec):
    """One message of a model grader's `input`; its text may hold templates."""

    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | InputText | list[InputText]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [self.content] if isinstance(self.content, InputText) else self.content
        return "".join(part.text for part in parts)


class SamplingParams(_Spec):
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_completions_tokens: int | None = Field(None, ge=1, description="sent as max_tokens")
    reasoning_effort: str | None = None


class _Grader(_Spec):
    name: str = Field(min_length=1)


class StringCheckGrader(_Grader):
    type: Literal["string_check"]
    input: str = Field(description="template, e.g. {{ sample.output_text }}")
    reference: str = Field(description="template, e.g. {{ item.reference }}")
    operation: Literal["eq", "ne", "like", "ilike"] = Field(
        description="eq / ne: equal / not equal; like: input contains reference; ilike: the same, ignoring case"
    )

    @field_validator("input", "reference")
    @classmethod
    def _templates(cls, value: str) -> str:
        return _templates_ok(value)


class _Endpoint(BaseModel):
    """Where a model (judge or embedding) is called: any OpenAI-compatible server."""

    base_url: str = Field(OPENAI_BASE_URL, description="an OpenAI-compatible API root: tunelab serve, vLLM, Ollama ...")
    api_key_env: str | None = Field(
        None, description="the NAME of the environment variable holding the API key (never the key itself); "
        "default: OPENAI_API_KEY for api.openai.com, none elsewhere",
    )
    timeout_s: float = Field(60.0, gt=0, description="per HTTP call")
    max_retries: int = Field(3, ge=0, description="retries of a failed call (429, 5xx, connection), backoff doubling from 1 s")
    concurrency: int = Field(4, ge=1, description="calls in flight at once")

    @model_validator(mode="before")
    @classmethod
    def _a_name_not_a_key(cls, data: Any) -> Any:
        # checked on the whole mapping, so that an error message never echoes a pasted key
        value = data.get("api_key_env") if isinstance(data, dict) else None
        if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("api_key_env is the NAME of an environment variable holding the key (e.g. "
                             "JUDGE_API_KEY), not the key itself")
        return data

    @property
    def key_env(self) -> str | None:
        if self.api_key_env:
            return self.api_key_env
        return "OPENAI_API_KEY" if self.base_url.rstrip("/") == OPENAI_BASE_URL else None


class TextSimilarityGrader(_Grader, _Endpoint):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: Literal[TEXT_SIMILARITY_METRICS]  # type: ignore[valid-type]
    pass_threshold: float | None = None
    embedding_model: str | None = Field(None, description="cosine only: the model of the /embeddings endpoint at base_url")

    @field_validator("input", "reference")
    @classmethod
    def _templates(cls, value: str) -> str:
        return _templates_ok(value)

    @model_validator(mode="after")
    def _cosine_needs_embeddings(self) -> TextSimilarityGrader:
        if self.evaluation_metric == "cosine" and not self.embedding_model:
            raise ValueError(
                "evaluation_metric cosine needs an embedding model: set embedding_model (and base_url, an "
                "OpenAI-compatible /embeddings endpoint); tunelab has no default embedding model"
            )
        return self


class PythonGrader(_Grader):
    type: Literal["python"]
    source: str = Field(description="Python code defining grade(sample, item) -> float")
    image_tag: str | None = Field(None, description="accepted for OpenAI compatibility; the code runs in this Python")
    pass_threshold: float | None = None
    timeout_s: float = Field(10.0, gt=0, description="per call of grade(); a call past it fails for that example")
    range: tuple[float, float] | None = Field(None, description="[low, high] of grade()'s scores, so the verdict "
                                              "reads them as points of that scale; default: inferred from the scores")

    @field_validator("source")
    @classmethod
    def _defines_grade(cls, source: str) -> str:
        try:
            tree = ast.parse(source)
        except SyntaxError as err:
            raise ValueError(f"source is not valid Python (line {err.lineno}: {err.msg})") from None
        grade = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "grade"), None)
        if grade is None:
            raise ValueError("source must define a function grade(sample, item) -> float")
        if len(grade.args.args) + len(grade.args.posonlyargs) != 2 and grade.args.vararg is None:
            raise ValueError("grade must take two arguments: grade(sample, item)")
        return source


class ScoreModelGrader(_Grader, _Endpoint):
    type: Literal["score_model"]
    model: str
    input: list[JudgeMessage] = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)
    pass_threshold: float | None = None
    sampling_params: SamplingParams | None = None

    @field_validator("input")
    @classmethod
    def _templates(cls, messages: list[JudgeMessage]) -> list[JudgeMessage]:
        return [m for m in messages if _templates_ok(m.text)]

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(value)}")
        return value


class LabelModelGrader(_Grader, _Endpoint):
    type: Literal["label_model"]
    model: str
    input: list[JudgeMessage] = Field(min_length=1)
    labels: list[str] = Field(min_length=2)
    passing_labels: list[str] = Field(min_length=1)
    sampling_params: SamplingParams | None = None

    @field_validator("input")
    @classmethod
    def _templates(cls, messages: list[JudgeMessage]) -> list[JudgeMessage]:
        return [m for m in messages if _templates_ok(m.text)]

    @model_validator(mode="after")
    def _passing_are_labels(self) -> LabelModelGrader:
        unknown = [label for label in self.passing_labels if label not in self.labels]
        if unknown:
            raise ValueError(f"passing_labels {unknown} are not in labels {self.labels}")
        return self


class PairwiseJudge(_Spec, _Endpoint):
    """tunelab's own (OpenAI has no pairwise grader): a judge that sees two arms' outputs for one example
    and says which is better. Asked in both orders; a disagreement between the orders is a tie."""

    model: str
    input: list[JudgeMessage] = Field(
        min_length=1, description="templates: {{ item.* }}, {{ sample_a.output_text }}, {{ sample_b.output_text }}"
    )
    sampling_params: SamplingParams | None = None

    @field_validator("input")
    @classmethod
    def _templates(cls, messages: list[JudgeMessage]) -> list[JudgeMessage]:
        return [m for m in messages if _templates_ok(m.text, ("sample", "item", "sample_a", "sample_b"))]


SubGrader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader,
    Field(discriminator="type"),
]


class MultiGrader(_Grader):
    type: Literal["multi"]
    graders: dict[str, SubGrader] = Field(description="name -> grader (a list or a single grader is keyed by names)")
    calculate_output: str = Field(description="arithmetic over the graders' names: + - * / ^ ( ), min max abs floor "
                                              "ceil exp sqrt log, e.g. '0.7 * voice + 0.3 * rouge'")
    range: tuple[float, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _key_by_name(cls, data: Any) -> Any:
        if isinstance(data, dict):
            graders = data.get("graders")
            if isinstance(graders, dict) and isinstance(graders.get("type"), str):
                graders = [graders]  # OpenAI's SDK types allow one grader object here
            if isinstance(graders, list):
                keyed: dict[str, Any] = {}
                for grader in graders:
                    name = grader.get("name") if isinstance(grader, dict) else None
                    if not isinstance(name, str) or not name:
                        raise ValueError("every grader inside multi needs a name (the formula refers to it)")
                    if name in keyed:
                        raise ValueError(f"two graders inside multi are named '{name}'")
                    keyed[name] = grader
                data = {**data, "graders": keyed}
            elif isinstance(graders, dict):
                data = {**data, "graders": {key: {"name": key, **value} if isinstance(value, dict) else value
                                            for key, value in graders.items()}}
        return data

    @model_validator(mode="after")
    def _formula_over_names(self) -> MultiGrader:
        unknown = sorted(formula_names(self.calculate_output) - set(self.graders))
        if unknown:
            raise ValueError(f"calculate_output names {unknown}, which are not graders of this multi "
                             f"(graders: {sorted(self.graders)})")
        return self


Grader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader | MultiGrader,
    Field(discriminator="type"),
]
MODEL_GRADER_TYPES = (ScoreModelGrader, LabelModelGrader)
_GRADER_LIST: TypeAdapter[list[Any]] = TypeAdapter(list[Grader])


GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")


def strip_union_tags(loc: tuple[str, ...]) -> tuple[str, ...]:
    """A validation error's location without the grader-type steps pydantic adds for tagged unions
    (('graders', '0', 'python', 'source') -> ('graders', '0', 'source')), so it matches the file's keys."""
    return tuple(part for i, part in enumerate(loc)
                 if not (part in GRADER_TYPES and i > 0 and (loc[i - 1].isdigit() or (i > 1 and loc[i - 2] == "graders"))))


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)
        elif isinstance(node, yaml.SequenceNode):  # list items by index: eval.graders.0.source
            for index, item_node in enumerate(node.value):
                key_path = (*path, str(index))
                lines[key_path] = item_node.start_mark.line + 1
                walk(item_node, key_path)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def line_of(key: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> int | None:
    """The line of the deepest part of `key` the file has (a missing field: its grader's line)."""
    return next((lines[key[:i]] for i in range(len(key), 0, -1) if key[:i] in lines), None)


def check_names(graders: list[Any], reserved: tuple[str, ...] = ()) -> list[str]:
    """Problems with grader names: duplicates and names of built-in metrics (a column each in metrics.json)."""
    problems, seen = [], set()
    for grader in graders:
        if grader.name in seen:
            problems.append(f"two graders are named '{grader.name}'")
        elif grader.name in reserved:
            problems.append(f"grader name '{grader.name}' is a built-in metric's name; choose another")
        seen.add(grader.name)
    return problems


def parse_graders(value: Any, source: str, text: str = "") -> list[Any]:
    """One grader object or a list of them -> typed graders; errors name source:line:field."""
    as_list = [value] if isinstance(value, dict) else value
    if not isinstance(as_list, list):
        raise ConfigError(f"{source}: expected a grader object or a list of graders, got {type(value).__name__}")
    lines = key_lines(text) if text else {}
    try:
        graders = _GRADER_LIST.validate_python(as_list)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            loc = strip_union_tags(tuple(str(part) for part in error["loc"]))
            key = loc if isinstance(value, list) else loc[1:]  # a single object's keys sit at the top level
            where = f"{source}:{line}" if (line := line_of(key, lines)) else source
            field = "".join(f".{part}" for part in loc[1:])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: graders[{loc[0]}]{field}: {message}")
        raise ConfigError("\n".join(problems)) from None
    problems = check_names(graders)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    return graders


def read_graders_file(path: str | Path) -> list[Any]:
    """A JSON or YAML file of graders (one object or a list)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: graders file not found")
    try:
        text = path.read_text(encoding="utf-8")
        value = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: neither valid JSON nor YAML: {getattr(err, 'problem', None) or err}") from None
    return parse_graders(value, str(path), text)


def recipe_graders(cfg: Any) -> list[Any]:
    """eval.graders followed by the graders of eval.graders_file (config.py checked them together)."""
    return list(cfg.graders) + (read_graders_file(cfg.graders_file) if cfg.graders_file else [])


def grader_config(grader: Any) -> dict[str, Any]:
    """A grader as JSON for manifest.json and metrics.json (defaults written out)."""
    return grader.model_dump(mode="json")
