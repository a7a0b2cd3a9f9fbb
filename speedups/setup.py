"""Builds the C extensions ddb_cdc_speedups._decode and ddb_cdc_speedups._canonical (metadata is in
pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ddb_cdc_speedups._decode", ["src/ddb_cdc_speedups/_decode.c"],
                             depends=["src/ddb_cdc_speedups/_tags.h"],
                             extra_compile_args=["-O2"]),
                   Extension("ddb_cdc_speedups._canonical", ["src/ddb_cdc_speedups/_canonical.c"],
                             depends=["src/ddb_cdc_speedups/_tags.h"],
                             extra_compile_args=["-O2"])])
