"""The I/O shell: sockets, signals, files and clocks. Protocol decisions live in nts.core."""
