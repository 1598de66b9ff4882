# The Azure side of this xesp device (xesp azure export).
# Set RG (resource group), GATEWAY (the active-active VPN gateway) and
# XESP_PSK (the pre-shared key in xesp's psk_file) first, e.g.
#   XESP_PSK=$(cat /etc/xesp/xesp.psk)
az network local-gateway create --resource-group "$RG" --name xesp-onprem \
    --gateway-ip-address 192.0.2.1 \
    --local-address-prefixes 10.0.0.0/24 10.1.10.0/25 \
    --asn 65010 --bgp-peering-address 172.16.0.3
az network vpn-connection create --resource-group "$RG" --name xesp-to-azure \
    --vnet-gateway1 "$GATEWAY" --local-gateway2 xesp-onprem \
    --shared-key "$XESP_PSK" --enable-bgp
az network vpn-connection ipsec-policy add --resource-group "$RG" --connection-name xesp-to-azure \
    --ike-encryption GCMAES256 --ike-integrity SHA384 --dh-group ECP384 \
    --ipsec-encryption GCMAES256 --ipsec-integrity GCMAES256 --pfs-group ECP384 \
    --sa-lifetime 27000 --sa-max-size 102400000
az network vpn-connection update --resource-group "$RG" --name xesp-to-azure \
    --set dpdTimeoutSeconds=45
