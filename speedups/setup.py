"""Builds the C extension ddb_cdc_speedups._decode (metadata is in pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ddb_cdc_speedups._decode", ["src/ddb_cdc_speedups/_decode.c"],
                             extra_compile_args=["-O2"])])
