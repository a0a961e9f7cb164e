#!/usr/bin/env bash
# The install steps of the image build, in one script so that they also run (and
# are tested: tests/test_image.py) outside Docker, against a temporary venv.
#
#   install.sh package PYTHON SRC   build SRC (the source tree) into a wheel and install it,
#                                   with its dependencies pinned by SRC/constraints.txt,
#                                   into PYTHON's environment
#   install.sh jars PYTHON DEST [COORDS]
#                                   resolve the Delta JARs this package needs (plus any
#                                   comma-separated Maven COORDS, e.g. hadoop-aws for s3a://)
#                                   with Spark's own Ivy, and copy them into DEST (in the
#                                   image: Spark's jars/ folder, so nothing is fetched at run time)
#   install.sh check PYTHON         offline smoke test of the result: the CLI answers, the
#                                   default model loads from site-packages, Delta is on
#                                   Spark's classpath
#
# pip honours its usual PIP_* variables (the test sets PIP_NO_INDEX=1 to stay offline).
set -euo pipefail

usage() {
    sed -n '4,17p' "$0" >&2
    exit 2
}

package() {
    local python="$1" src="$2" wheels
    wheels="$(mktemp -d)"
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    cp -a "${src}" "${wheels}/src"
    "${python}" -m pip wheel --no-cache-dir --no-deps --wheel-dir "${wheels}" "${wheels}/src"
    "${python}" -m pip install --no-cache-dir --constraint "${src}/constraints.txt" \
        "${wheels}"/deltavec-*.whl
    rm -rf "${wheels}"
}

jars() {
    local python="$1" dest="$2" extra="${3:-}" spark_home coordinates ivy
    spark_home="$("${python}" -I -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
    coordinates="$("${python}" -I -c 'from deltavec.runtime.session import delta_packages as p; print(",".join(p()))')"
    coordinates="${coordinates}${extra:+,${extra}}"
    ivy="$(mktemp -d)"
    # spark-submit resolves --packages before it starts the application, so a
    # program that does nothing is enough; Ivy looks in ~/.m2 before Maven Central.
    echo "pass" > "${ivy}/noop.py"
    PYSPARK_PYTHON="${python}" SPARK_HOME="${spark_home}" "${spark_home}/bin/spark-submit" \
        --master "local[1]" --packages "${coordinates}" --conf "spark.jars.ivy=${ivy}" \
        "${ivy}/noop.py"
    mkdir -p "${dest}"
    local jar name
    for jar in "${ivy}"/jars/*.jar; do
        # Ivy names a JAR <organisation>_<artifact>-<version>.jar; Spark's jars/
        # folder uses <artifact>-<version>.jar. A JAR Spark already ships (antlr4)
        # is kept as it is.
        name="$(basename "${jar}")"
        name="${name#*_}"
        if [[ -e "${dest}/${name}" ]]; then
            echo "kept ${name} (Spark ships it)" >&2
        else
            cp "${jar}" "${dest}/${name}"
            echo "added ${name}" >&2
        fi
    done
    rm -rf "${ivy}"
}

check() {
    local python="$1"
    "$(dirname "${python}")/deltavec" --help > /dev/null
    # -I: import what is installed, not the checkout's source folder in the working directory.
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "${python}" -I - << 'EOF'
import deltavec
from deltavec.embed.encoder import Encoder, EncoderSpec
from deltavec.embed.models import resolve_model
from deltavec.runtime.session import delta_on_classpath, spark_home

encoder = Encoder(EncoderSpec(model=resolve_model("default"), device="cpu"))
vectors, _ = encoder.encode(["deltavec image check"])
assert vectors.shape == (1, 384), vectors.shape
assert delta_on_classpath(), f"no delta-spark JAR in {spark_home()}/jars"
print(f"deltavec ok: {deltavec.__file__}, model {encoder.spec.model}, jars in {spark_home()}/jars")
EOF
}

[[ $# -ge 2 ]] || usage
step="$1"
shift
case "${step}" in
    package) [[ $# -eq 2 ]] || usage; package "$@" ;;
    jars) [[ $# -eq 2 || $# -eq 3 ]] || usage; jars "$@" ;;
    check) [[ $# -eq 1 ]] || usage; check "$@" ;;
    *) usage ;;
esac
