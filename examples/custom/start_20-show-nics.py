#!/usr/bin/python3
"""Runs before QEMU starts: lists the guest's network interfaces from the domain XML."""

import sys
import xml.etree.ElementTree as ET

domain, operation, subop, extra = sys.argv[1:5]
root = ET.fromstring(sys.stdin.buffer.read())
for nic in root.iterfind("./devices/interface"):
    source = nic.find("source")
    mac = nic.find("mac")
    bridge = source.get("bridge") if source is not None else "?"
    address = mac.get("address") if mac is not None else "?"
    print(f"{domain}: nic {address} on bridge {bridge}")
