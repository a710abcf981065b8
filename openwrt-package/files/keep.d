/etc/netpilot/
