"""Thin KFP v2 components over the library's stage functions (flexi_jest.stages)."""
