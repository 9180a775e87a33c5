"""The papers emscope implements, and how the report and the claims table cite them.

One list, so that every citation names the same title and arXiv id. The methods themselves,
with emscope's defaults, the papers' published values and the reference code's defects that
emscope corrects, are in ``docs/methods.md`` (cited as "docs/methods.md section N").
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS_DOC = "docs/methods.md"
"""The project's method reference, relative to the repository root."""


@dataclass(frozen=True)
class Paper:
    """A paper: a short name for tables, its full title and its arXiv id."""

    short: str
    title: str
    arxiv: str

    def cite(self) -> str:
        """``"<title>" (arXiv <id>)``."""
        return f'"{self.title}" (arXiv {self.arxiv})'


BETLEY = Paper(
    "Betley et al.",
    "Emergent Misalignment: Narrow finetuning can produce broadly misaligned LLMs",
    "2502.17424",
)
MODEL_ORGANISMS = Paper(
    "Model organisms", "Model Organisms for Emergent Misalignment", "2506.11613"
)
CONVERGENT = Paper(
    "Convergent representations",
    "Convergent Linear Representations of Emergent Misalignment",
    "2506.11618",
)
SHARED_SUBSPACES = Paper(
    "Shared subspaces",
    "Shared Parameter Subspaces and Cross-Task Linearity in Emergently Misaligned Behavior",
    "2511.02022",
)
REEMERGENT = Paper(
    "Re-emergent misalignment",
    "Re-Emergent Misalignment: How Narrow Fine-Tuning Erodes Safety Alignment in LLMs",
    "2507.03662",
)

PERSONA_VECTORS = Paper(
    "Persona vectors",
    "Persona Vectors: Monitoring and Controlling Character Traits in Language Models",
    "2507.21509",
)

KACZER = Paper(
    "Kaczér et al.",
    "In-training defenses against emergent misalignment in language models",
    "2508.06249",
)

INOCULATION = Paper(
    "Tan et al.",
    "Inoculation Prompting: Eliciting traits from LLMs during training can suppress them at "
    "test-time",
    "2510.04340",
)

#: The papers the claims table tests findings of (its section's source line).
CLAIMS_PAPERS: tuple[Paper, ...] = (
    CONVERGENT, SHARED_SUBSPACES, REEMERGENT, PERSONA_VECTORS, KACZER, INOCULATION,
)  # fmt: skip

PAPERS: tuple[Paper, ...] = (
    BETLEY, MODEL_ORGANISMS, CONVERGENT, SHARED_SUBSPACES, REEMERGENT, PERSONA_VECTORS, KACZER,
    INOCULATION,
)  # fmt: skip


def methods_section(number: int | str) -> str:
    """``"docs/methods.md section <number>"``: how code and the report cite the methods doc."""
    return f"{METHODS_DOC} section {number}"


def source_line(papers: tuple[Paper, ...] | list[Paper], section: int | str) -> str:
    """A report section's source line: the papers by title and arXiv id, then the methods
    doc section, e.g. ``"Convergent Linear ..." (arXiv 2506.11618); method: docs/methods.md
    section 5``."""
    cited = "; ".join(p.cite() for p in papers)
    return f"{cited}; method: {methods_section(section)}" if cited else methods_section(section)
