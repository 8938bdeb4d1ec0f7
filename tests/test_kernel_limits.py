"""The kernels' limits reach Python from one place: the C++ constants, exported as ``gate._C.limits``
(csrc/bindings/registration.cpp). Without the extension gate.tuning keeps copies of the three it
needs; these tests keep the copies and the export in step with the headers."""

import re
from pathlib import Path

import pytest

from gate import ops, tuning

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"


def header_constants() -> dict[str, int]:
    """Every ``constexpr int`` / ``int64_t`` constant of the kernels' public headers, by C++ name."""
    found = {}
    for header in sorted(KERNELS.glob("*.h")):
        for name, value in re.findall(r"constexpr (?:int|int64_t) (k\w+) = ([\d']+);", header.read_text()):
            found[name] = int(value.replace("'", ""))
    return found


def exported_constants() -> dict[str, str]:
    """The keys of gate._C.limits and the C++ constant each one is, as registration.cpp writes them."""
    source = (ROOT / "csrc" / "bindings" / "registration.cpp").read_text()
    return dict(re.findall(r'limits\["(\w+)"\] = moegate::(k\w+);', source))


def test_every_export_is_a_header_constant():
    exported, constants = exported_constants(), header_constants()
    assert set(exported) == {"sm90_max_m", "sm90_max_e", "small_m_max_m", "cublas_crossover_macs",
                             "route_max_k", "route_max_e"}
    assert set(exported.values()) <= set(constants), set(exported.values()) - set(constants)


def test_the_python_copies_are_the_header_values():
    exported, constants = exported_constants(), header_constants()
    assert tuning.MIRRORED_LIMITS == {key: constants[exported[key]] for key in tuning.MIRRORED_LIMITS}


def test_tuning_reads_the_limits_it_has():
    limits = ops.kernel_limits() or tuning.MIRRORED_LIMITS
    assert (tuning.SM90_MAX_M, tuning.SM90_MAX_E, tuning.SMALL_M_MAX_M) == (
        limits["sm90_max_m"], limits["sm90_max_e"], limits["small_m_max_m"])
    if not ops.extension_available():
        assert ops.kernel_limits() is None


@pytest.mark.kernel
def test_the_extension_exports_the_header_values():
    exported, constants = exported_constants(), header_constants()
    assert ops.kernel_limits() == {key: constants[name] for key, name in exported.items()}
    assert {key: ops.kernel_limits()[key] for key in tuning.MIRRORED_LIMITS} == tuning.MIRRORED_LIMITS
