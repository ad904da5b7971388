"""The compiler: problem spec -> smooth standard form -> KKT system -> torch code.

    spec --canonicalize--> StackedProblem --derive_kkt--> KKTSystem --generate--> GeneratedCode

Each stage is a pure function of its input (see the modules of the same names). This
package never imports the torch layer; ``declarative`` is its only client.
"""
from dataclasses import dataclass

from .canonicalize import (
    CompileError,
    ConstraintSpec,
    ParameterSpec,
    ProblemSpec,
    StackedProblem,
    VariableSpec,
    canonicalize,
)
from .codegen import GeneratedCode, generate
from .kkt import KKTSystem, derive_kkt

__all__ = [
    "CompileError", "ConstraintSpec", "ParameterSpec", "ProblemSpec", "VariableSpec",
    "StackedProblem", "KKTSystem", "GeneratedCode", "CompiledProblem",
    "canonicalize", "derive_kkt", "generate", "compile_problem",
]


@dataclass(frozen=True)
class CompiledProblem:
    kkt: KKTSystem
    code: GeneratedCode

    @property
    def problem(self) -> StackedProblem:
        return self.kkt.problem


def compile_problem(spec: ProblemSpec) -> CompiledProblem:
    kkt = derive_kkt(canonicalize(spec))
    return CompiledProblem(kkt, generate(kkt))
