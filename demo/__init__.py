"""Embedded demo data: a multi-site brain phantom built from the MNI ICBM152 template shipped by nilearn.

``python -m demo.phantom --help`` generates it; see :mod:`demo.phantom`.
"""
