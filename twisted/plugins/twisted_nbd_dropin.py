# -*- test-case-name: tests.test_plugin -*-
"""
The C{twistd nbd} / C{twist nbd} plugin.

Every run of twistd imports every dropin, so this one only names the module
that does the work: L{twisted_nbd.tap} is imported when C{nbd} is chosen.
"""

from twisted.application.service import ServiceMaker

nbd = ServiceMaker("twisted-nbd", "twisted_nbd.tap", "Serve block devices over NBD.", "nbd")
