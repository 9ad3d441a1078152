"""kvmhook: the agent-side package for KVM hosts run by a cloud controller.

Deliberately empty: `kvmhook.qemu` runs on every guest start and must not
pay for anything imported here.
"""
