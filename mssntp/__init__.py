"""MS-SNTP ([MS-SNTP]) for Samba AD domain controllers, signed through Samba's ntp_signd socket."""
