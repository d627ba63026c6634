"""The exchange in a box: the netns lab, the MoldUDP64 publisher, its re-request server
and fault plan, BPF wire faults, the in-kernel packet generator, the ITCH session
generator and ``make demo``. It may import the appliance's codecs and control plane."""
