"""Composer algorithms of wesar-composer, one folder each."""
